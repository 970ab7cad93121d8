"""The views' photometric half on the device: each sample equals torchvision's functions under its own draws,
the draws follow the authors' distribution, a seed repeats, and the whole view matches the worker-only one."""
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from open_clip_safe.augment import SeparableGaussianBlur, blur_kernel_size, image_views_like, safeclip_image_augment
from open_clip_safe.photometric import (AUTHORS_BLUR_SIGMA, AUTHORS_JITTER, BRIGHTNESS, CONTRAST, HUE, SATURATION,
                                        Photometric)

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
TORCHVISION_JITTER = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast,
                      SATURATION: TF.adjust_saturation, HUE: TF.adjust_hue}


def colourful(size=32, seed=0):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, -ramp) / 2 + 128,
                       rng.integers(0, 256, (size, size))], axis=-1)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def reference_view(image, parameters, i, photometric):
    """Sample i as torchvision's functions make it, one image at a time, in the drawn order."""
    view = image.float() / 255
    if parameters.jitter[i]:
        for operation in parameters.order[i].tolist():
            view = TORCHVISION_JITTER[operation](view, float(parameters.factors[i, operation]))
    if parameters.grayscale[i]:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    size, sigma = photometric.blur_kernel, float(parameters.sigma[i])
    view = TF.gaussian_blur(view, [size, size], [sigma, sigma])
    return TF.normalize(view, MEAN, STD)


@pytest.mark.parametrize("size", [32, 64])
def test_each_sample_equals_torchvisions_functions_under_its_own_draws(size):
    torch.manual_seed(0)
    photometric = Photometric(MEAN, STD, blur_kernel_size(size))
    images = torch.randint(0, 256, (48, 3, size, size), dtype=torch.uint8)
    parameters = photometric.sample(len(images))
    assert parameters.jitter.any() and not parameters.jitter.all() and parameters.grayscale.any()
    views = photometric.apply(images, parameters)
    assert views.shape == images.shape and views.dtype == torch.float32
    for i in range(len(images)):
        torch.testing.assert_close(views[i], reference_view(images[i], parameters, i, photometric),
                                   atol=2e-5, rtol=0)


def test_a_float_batch_is_left_as_it_was():
    images = torch.rand(4, 3, 16, 16)
    before = images.clone()
    Photometric(MEAN, STD, 3)(images)
    assert torch.equal(images, before)


def test_draws_follow_the_authors_distribution():
    torch.manual_seed(1)
    n = 20000
    parameters = Photometric(MEAN, STD, 21).sample(n)
    assert abs(parameters.jitter.float().mean() - 0.8) < 0.015
    assert abs(parameters.grayscale.float().mean() - 0.2) < 0.015
    low, high = AUTHORS_BLUR_SIGMA
    assert parameters.sigma.min() >= low and parameters.sigma.max() <= high
    assert abs(parameters.sigma.mean() - (low + high) / 2) < 0.02
    assert abs(np.quantile(parameters.sigma.numpy(), 0.25) - (low + 0.25 * (high - low))) < 0.03  # uniform
    for operation, strength in enumerate(AUTHORS_JITTER):
        factors = parameters.factors[:, operation]
        centre = 0.0 if operation == HUE else 1.0
        assert factors.min() >= centre - strength and factors.max() <= centre + strength
        assert abs(factors.mean() - centre) < 0.01 and factors.std() > strength / 2
    for position in range(4):  # every operation equally often in every place of the order
        counts = torch.bincount(parameters.order[:, position], minlength=4).float() / n
        assert torch.all((counts - 0.25).abs() < 0.015), counts
    assert all(sorted(row) == [0, 1, 2, 3] for row in parameters.order[:100].tolist())


def test_a_seed_gives_the_same_views_and_another_seed_others():
    photometric = Photometric(MEAN, STD, 3)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)

    def views(seed):
        torch.manual_seed(seed)
        return photometric(images)

    assert torch.equal(views(3), views(3))
    assert not torch.equal(views(3), views(4))


def test_separable_blur_in_the_worker_equals_torchvisions_gaussian_blur():
    """Same kernel and the same draw of sigma: a seed gives torchvision's blurred image (to its rounding)."""
    image = colourful(64)
    size = blur_kernel_size(64)
    for seed in range(5):
        torch.manual_seed(seed)
        ours = SeparableGaussianBlur(size)(image)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        theirs = TF.to_tensor(transforms.GaussianBlur(size, AUTHORS_BLUR_SIGMA)(image))
        assert torch.equal(after_ours, torch.rand(1))  # one draw, as torchvision's
        assert (ours - theirs).abs().max() <= 1 / 255 + 1e-6


def test_views_on_the_device_match_views_in_the_workers_in_distribution():
    """The worker-only view and the split one (crop + flip in the worker, the rest on the device) give the
    same distribution of per-view statistics over many draws of one image."""
    image = colourful(40)
    preprocess = open_clip.image_transform(32, is_train=True, mean=MEAN, std=STD)
    in_workers, none = image_views_like(preprocess)
    worker_half, device_half = image_views_like(preprocess, on_device=True)
    assert none is None and isinstance(device_half, Photometric)
    torch.manual_seed(0)
    old = torch.stack([in_workers(image) for _ in range(1500)])
    half = torch.stack([worker_half(image) for _ in range(1500)])
    assert half.dtype == torch.uint8 and half.shape == (1500, 3, 32, 32)
    new = device_half(half)

    def statistics(views):
        flat = views.flatten(1)
        grey_share = (views.std(dim=1).mean(dim=(1, 2)) < 1e-3).float()  # grayscale views
        return {"mean": flat.mean(1), "spread": flat.std(1), "grey": grey_share,
                "sharpness": (views[..., 1:] - views[..., :-1]).abs().mean(dim=(1, 2, 3))}

    for name, (a, b) in {k: (statistics(old)[k], statistics(new)[k]) for k in statistics(old)}.items():
        for q in (0.1, 0.5, 0.9):
            qa, qb = torch.quantile(a, q), torch.quantile(b, q)
            assert abs(qa - qb) <= 0.06 * max(1.0, abs(qa)), (name, q, float(qa), float(qb))
        assert abs(a.mean() - b.mean()) <= 0.05 * max(1.0, abs(a.mean())), name


def test_safeclip_image_augment_takes_the_jitter_and_blur_settings():
    view = safeclip_image_augment(32, MEAN, STD, jitter=(0.2, 0.0, 0.3, 0.05), sigma=(0.5, 0.7))
    jitter = view.transforms[3].transforms[0]
    assert (jitter.brightness, jitter.contrast, jitter.hue) == ((0.8, 1.2), None, (-0.05, 0.05))
    assert view.transforms[5].sigma == (0.5, 0.7)
    _, device_half = image_views_like(open_clip.image_transform(32, is_train=True), on_device=True,
                                      jitter=(0.2, 0.0, 0.3, 0.05), sigma=(0.5, 0.7))
    parameters = device_half.sample(2000)
    assert parameters.sigma.min() >= 0.5 and parameters.sigma.max() <= 0.7
    assert parameters.factors[:, CONTRAST].eq(1).all() and parameters.factors[:, HUE].abs().max() <= 0.05
