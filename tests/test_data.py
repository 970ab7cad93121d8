"""Safe / risky subset streams: full batches of the wanted samples only, however thin the subset."""
import numpy as np
import open_clip
import pytest
import torch

from open_clip_safe.data import SplitLookup, get_safeclip_data, sample_id
from open_clip_safe.params import parse_args
from open_clip_safe.world import draw_sample, generate_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """250 samples in shards of 64, 64, 64, 58."""
    return generate_world(tmp_path_factory.mktemp("subsets"), num_train=250, num_test=4, seed=5, shard_size=64,
                          progress=False)


def subset_stream(world, tmp_path, wanted_keys, batch_size=16, workers=2):
    args = parse_args(["--train-data", world["splits"]["train"]["shards"], "--model", "safeclip-micro",
                       "--device", "cpu", "--batch-size", str(batch_size), "--workers", str(workers),
                       "--logs", str(tmp_path), "--name", "run", "--safeclip", "--epochs", "9"])
    args.rank, args.world_size, args.distributed = 0, 1, False
    _, preprocess, _ = open_clip.create_model_and_transforms("safeclip-micro")
    data = get_safeclip_data(args, preprocess, None, open_clip.get_tokenizer("safeclip-micro"))
    keys = [f"train_{i:07d}" for i in range(250)]
    ids = np.array([sample_id(key) for key in keys])
    lookup = SplitLookup(ids, np.array([key in wanted_keys for key in keys]))
    return data.train_loader(1, lookup, want_safe=True), {sample_id(key) for key in wanted_keys}


def test_a_subset_thinner_than_a_batch_per_worker_gets_whole_batches_of_distinct_samples(world, tmp_path):
    """21 safe samples, two workers, batches of 16: one batch (21 // 16), from one worker, no sample twice.
    Spread over both workers (about 10 each) every batch would repeat samples: false negatives."""
    wanted = {f"train_{i:07d}" for i in range(5, 250, 12)}
    loader, wanted_ids = subset_stream(world, tmp_path, wanted)
    batches = list(loader)
    assert loader.num_batches == len(batches) == 1
    for ids, image_v1, image_v2, text_v1, text_v2 in batches:
        assert len(ids) == 16 and set(ids.tolist()) <= wanted_ids and len(set(ids.tolist())) == 16
        assert image_v1.shape == image_v2.shape == (16, 3, 32, 32) and text_v1.shape == text_v2.shape


def test_one_rule_sizes_csv_and_webdataset_streams_and_the_plan(world, tmp_path):
    """batches_for: whole global batches, the same for both formats; fewer samples than a batch: none."""
    from open_clip_safe.data import batches_for, worker_shares

    for kind in ("shards", "csv"):
        args = parse_args(["--train-data", world["splits"]["train"][kind], "--model", "safeclip-micro",
                           "--device", "cpu", "--batch-size", "16", "--workers", "2", "--logs", str(tmp_path),
                           "--name", "run", "--safeclip", "--epochs", "9"])
        args.rank, args.world_size, args.distributed = 0, 1, False
        _, preprocess, _ = open_clip.create_model_and_transforms("safeclip-micro")
        data = get_safeclip_data(args, preprocess, None, open_clip.get_tokenizer("safeclip-micro"))
        assert data.dataloader.num_batches == len(list(data.dataloader)) == batches_for(250, args) == 15
        assert data.batches_for(15) == 0 and data.batches_for(47) == 2
    assert worker_shares(15, 2) == [8, 7] and worker_shares(1, 4) == [1] and worker_shares(0, 2) == [0]


def test_split_lookup_packs_id_and_membership_in_eight_bytes():
    ids = np.array([sample_id(f"k{i}") for i in range(1000)])
    safe = np.arange(1000) % 3 == 0
    lookup = SplitLookup(ids.copy(), safe)
    assert lookup.packed.nbytes == 8 * 1000 and (lookup.num_safe, lookup.num_risky) == (334, 666)
    np.testing.assert_array_equal(lookup.is_safe(ids), safe)
    assert not lookup.is_safe([sample_id("not a sample")]).any()
    rows = SplitLookup(np.arange(10), np.arange(10) >= 7)
    assert rows.subset_indices(True).tolist() == [7, 8, 9] and rows.subset_indices(False).tolist() == list(range(7))


def test_a_worker_whose_shards_hold_none_of_the_subset_says_so(world, tmp_path):
    wanted = {f"train_{i:07d}" for i in range(0, 8)}  # all in the first shard; the other worker has none
    loader, _ = subset_stream(world, tmp_path, wanted, batch_size=4)
    with pytest.raises(RuntimeError, match="found no sample of this subset in its shards; use fewer --workers"):
        list(loader)


@pytest.mark.slow
@pytest.mark.parametrize("image_aug", ["safeclip", "open_clip"])
def test_image_aug_choice_sets_the_training_views(world, tmp_path, image_aug, caplog):
    """--safeclip-image-aug open_clip: both views come from open_clip's train preprocess (--aug-cfg)."""
    from open_clip_safe import safeclip

    args = parse_args(["--train-data", world["splits"]["train"]["shards"], "--model", "safeclip-micro",
                       "--device", "cpu", "--batch-size", "16", "--workers", "1", "--logs", str(tmp_path),
                       "--name", "run", "--safeclip", "--epochs", "9", "--safeclip-text-aug", "none",
                       "--safeclip-image-aug", image_aug, "--aug-cfg", "scale=(1.0,1.0)"])
    args.rank, args.world_size, args.distributed = 0, 1, False
    _, train_preprocess, eval_preprocess = open_clip.create_model_and_transforms("safeclip-micro",
                                                                                aug_cfg=args.aug_cfg)
    train = safeclip.get_data(args, (train_preprocess, eval_preprocess), epoch=0,
                              tokenizer=open_clip.get_tokenizer("safeclip-micro"))["train"]
    _, image_v1, image_v2, _, _ = next(iter(train.dataloader))
    # open_clip's crop of the whole image is the image itself, as the eval preprocess gives it
    plain = {eval_preprocess(image).numpy().tobytes() for image, _, _ in
             (draw_sample(5, "train", index) for index in range(250))}
    if image_aug == "open_clip":
        assert train.views.image_augment is train_preprocess
        assert torch.equal(image_v1, image_v2)
        assert all(view.numpy().tobytes() in plain for view in image_v1)
    else:
        assert not torch.allclose(image_v1, image_v2)
        assert not any(view.numpy().tobytes() in plain for view in image_v1)
        assert "--aug-cfg does not change SafeCLIP's image views" in caplog.text


@pytest.mark.parametrize("kind", ["shards", "csv"])
def test_a_one_view_stream_carries_the_same_samples_without_view_two(world, tmp_path, kind):
    """A step that embeds view 1 only (the one-view CLIP loss) gets batches whose view 2 is empty:
    no second augmentation or tokenizing; the samples, their order and caption view 1 are unchanged."""
    args = parse_args(["--train-data", world["splits"]["train"][kind], "--model", "safeclip-micro",
                       "--device", "cpu", "--batch-size", "16", "--workers", "1", "--logs", str(tmp_path),
                       "--name", "run", "--safeclip", "--epochs", "9", "--seed", "3"])
    args.rank, args.world_size, args.distributed = 0, 1, False
    _, preprocess, _ = open_clip.create_model_and_transforms("safeclip-micro")
    data = get_safeclip_data(args, preprocess, None, open_clip.get_tokenizer("safeclip-micro"))
    both, one = list(data.train_loader(2)), list(data.train_loader(2, both_views=False))
    assert len(both) == len(one) == 15
    for (ids, image_v1, image_v2, text_v1, text_v2), (ids_1, image_1, no_image, text_1, no_text) in zip(both, one):
        assert torch.equal(ids, ids_1) and torch.equal(text_v1, text_1)
        assert image_1.shape == image_v2.shape == (16, 3, 32, 32)
        assert no_image.shape == no_text.shape == (16, 0)
