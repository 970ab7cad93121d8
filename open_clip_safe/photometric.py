"""The photometric half of the authors' image views, on the training device, a whole batch at once.

At 224 px torchvision's 21 x 21 Gaussian blur and a colour jitter with hue, one image at a time on a
data-loader worker's core, cost many times open_clip's whole training view, and the GPU starves
(docs/design.md#image-views-on-the-device). With `--safeclip-augment-on device` the workers only decode,
crop and flip (uint8 tensors, a quarter of the bytes to copy), and this module applies the rest after
the copy: colour jitter (p 0.8, its four operations in a random order per sample, as torchvision's
ColorJitter), grayscale (p 0.2), a Gaussian blur of the same truncated kernel as torchvision's
GaussianBlur (separable, sigma per sample), then the model's normalisation.

Every per-sample parameter is drawn on the CPU from torch's default generator, which the training loop
reseeds each epoch: the same seed gives the same views run to run, and on a GPU the same parameters.
Each operation follows torchvision.transforms.functional's formula for float images; a test checks each
sample against those functions applied one image at a time.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AUTHORS_JITTER = (0.5, 0.5, 0.5, 0.1)  # brightness, contrast, saturation, hue (torchvision's ColorJitter)
AUTHORS_JITTER_P = 0.8
AUTHORS_GRAYSCALE_P = 0.2
AUTHORS_BLUR_SIGMA = (0.1, 2.0)  # torchvision GaussianBlur's default range
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclass
class ViewParameters:
    """Per-sample draws for a batch of n views (CPU tensors)."""

    jitter: torch.Tensor  # [n] bool: colour jitter applied
    order: torch.Tensor  # [n, 4] long: the jitter operations in the order applied
    factors: torch.Tensor  # [n, 4] float: brightness, contrast, saturation, hue factors
    grayscale: torch.Tensor  # [n] bool
    sigma: torch.Tensor  # [n] float: the blur's standard deviation


def grey(images):
    """[n, 1, H, W] luma of [n, 3, H, W] RGB images."""
    r, g, b = images.unbind(1)
    return (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).unsqueeze(1)


def blend(images, other, factor):
    """factor * images + (1 - factor) * other, clamped to [0, 1]; factor per sample."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1 - factor) * other).clamp_(0, 1)


def shift_hue(images, shift):
    """Rotate each sample's hue by `shift` (a share of the circle): RGB -> HSV, add, HSV -> RGB."""
    value, _ = images.max(1)
    chroma = value - images.min(1)[0]
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = ((value.unsqueeze(1) - images) / safe_chroma.unsqueeze(1)).unbind(1)  # distances from the maximum
    is_r, is_g = value == images[:, 0], value == images[:, 1]
    sector = torch.where(is_r, b - g, torch.where(is_g, 2.0 + r - b, 4.0 + g - r))
    hue = torch.where(chroma > 0, sector / 6.0, torch.zeros_like(sector))
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    # HSV -> RGB, channel n at (n + 6 hue) mod 6 of the hexcone, for n = 5, 3, 1 (R, G, B)
    offsets = torch.tensor((5.0, 3.0, 1.0), device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = torch.remainder(offsets + 6.0 * hue.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return (value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * ramp)).clamp_(0, 1)


def jitter_operation(operation, images, factor):
    if operation == BRIGHTNESS:
        return blend(images, torch.zeros_like(images), factor)
    if operation == CONTRAST:
        return blend(images, grey(images).mean(dim=(1, 2, 3), keepdim=True), factor)
    if operation == SATURATION:
        return blend(images, grey(images), factor)
    return shift_hue(images, factor)


def gaussian_kernels(sigma, size):
    """[n, size] 1-D Gaussian kernels, torchvision's (sampled at integer offsets, truncated, normalised)."""
    offsets = torch.linspace(-(size // 2), size // 2, size, dtype=torch.float32)
    kernels = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def gaussian_blur(images, sigma, size):
    """Each sample blurred with its own sigma: reflect padding, a row pass then a column pass (one grouped
    convolution each), equal to torchvision's 2-D kernel, the outer product of the same 1-D kernel."""
    n, channels, height, width = images.shape
    kernels = gaussian_kernels(sigma, size).to(device=images.device, dtype=images.dtype)
    kernels = kernels.repeat_interleave(channels, dim=0)  # [n * channels, size]
    pad = size // 2
    flat = F.pad(images.reshape(1, n * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernels.view(-1, 1, 1, size), groups=n * channels)
    flat = F.conv2d(flat, kernels.view(-1, 1, size, 1), groups=n * channels)
    return flat.view(n, channels, height, width)


class Photometric:
    """Jitter, grayscale, blur and normalisation of uint8 (or [0, 1] float) view batches.

    The worker half of the same views is `augment.worker_views`; together they are the authors'
    augmentation (`augment.safeclip_image_augment`) with the work moved.
    """

    def __init__(self, mean, std, blur_kernel, jitter=AUTHORS_JITTER, sigma=AUTHORS_BLUR_SIGMA,
                 jitter_p=AUTHORS_JITTER_P, grayscale_p=AUTHORS_GRAYSCALE_P):
        self.mean, self.std = tuple(mean), tuple(std)
        self.blur_kernel, self.jitter, self.sigma = blur_kernel, tuple(jitter), tuple(sigma)
        self.jitter_p, self.grayscale_p = jitter_p, grayscale_p

    def __repr__(self):
        return (f"Photometric(jitter={self.jitter} p={self.jitter_p}, grayscale p={self.grayscale_p}, "
                f"blur kernel {self.blur_kernel} sigma={self.sigma}, normalize mean={self.mean} std={self.std})")

    def sample(self, n):
        """Draws as torchvision's RandomApply(ColorJitter), RandomGrayscale and GaussianBlur make them."""
        brightness, contrast, saturation, hue = self.jitter
        low = torch.tensor([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue])
        high = torch.tensor([1 + brightness, 1 + contrast, 1 + saturation, hue])
        return ViewParameters(
            jitter=torch.rand(n) < self.jitter_p,
            order=torch.rand(n, 4).argsort(dim=1),
            factors=low + (high - low) * torch.rand(n, 4),
            grayscale=torch.rand(n) < self.grayscale_p,
            sigma=self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(n))

    def apply(self, images, parameters):
        """The views of `images` ([n, 3, H, W] on any device) under `parameters`, normalised, float32."""
        images = images.float().div_(255) if images.dtype == torch.uint8 else images.float().clone()
        device = images.device
        for position in range(4):
            for operation in range(4):
                chosen = parameters.jitter & (parameters.order[:, position] == operation)
                if operation == HUE and self.jitter[HUE] == 0 or not chosen.any():
                    continue
                rows = chosen.nonzero().squeeze(1)  # CPU indices: no device sync
                factor = parameters.factors[rows, operation].to(device)
                rows = rows.to(device)
                images[rows] = jitter_operation(operation, images[rows], factor)
        rows = parameters.grayscale.nonzero().squeeze(1)
        if len(rows):
            rows = rows.to(device)
            images[rows] = grey(images[rows]).expand(-1, 3, -1, -1)
        images = gaussian_blur(images, parameters.sigma, self.blur_kernel)
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return images.sub_(mean).div_(std)

    def __call__(self, images):
        return self.apply(images, self.sample(len(images)))
