"""The built-in world: deterministic, open_clip-readable, captions that name the class."""
import csv
import json
import os
import tarfile

import numpy as np
import pytest

from conftest import run_module
from open_clip_safe.world import CLASSES, draw_sample, generate_world


def tar_members(path):
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar if member.isfile()}


def test_layout_and_metadata(world):
    train = world["splits"]["train"]
    shard_dir = os.path.dirname(train["shards"])
    sizes = json.load(open(os.path.join(shard_dir, "sizes.json")))
    assert sizes == {f"{i:06d}.tar": 64 for i in range(4)}
    members = tar_members(os.path.join(shard_dir, "000001.tar"))
    keys = sorted({name.split(".")[0] for name in members})
    assert len(keys) == 64 and keys[0] == "train_0000064"
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        caption = members[f"{key}.txt"].decode()
        assert meta["class"] == CLASSES[meta["label"]] == CLASSES[int(members[f"{key}.cls"])]
        assert meta["class"] in caption
        assert members[f"{key}.png"].startswith(b"\x89PNG")
    rows = list(csv.DictReader(open(train["csv"]), delimiter="\t"))
    assert len(rows) == 256 and all(os.path.isfile(row["filepath"]) for row in rows)
    assert json.load(open(os.path.join(world["dir"], "world.json")))["classes"] == list(CLASSES)
    test_rows = list(csv.DictReader(open(world["splits"]["test"]["csv"]), delimiter="\t"))
    assert len(test_rows) == 64
    assert len({row["label"] for row in rows}) == len(CLASSES), "every class is present"


def test_same_seed_same_bytes_other_seed_other_world(world, tmp_path):
    again = generate_world(tmp_path / "again", num_train=256, num_test=64, seed=0, shard_size=64,
                           formats=("wds",), progress=False)
    other = generate_world(tmp_path / "other", num_train=64, num_test=8, seed=1, shard_size=64,
                           formats=("wds",), progress=False)
    first = os.path.join(os.path.dirname(world["splits"]["train"]["shards"]), "000000.tar")
    assert tar_members(first) == tar_members(os.path.join(os.path.dirname(again["splits"]["train"]["shards"]),
                                                          "000000.tar"))
    assert tar_members(first) != tar_members(os.path.join(os.path.dirname(other["splits"]["train"]["shards"]),
                                                          "000000.tar"))


def test_samples_vary_within_a_class():
    images = {}
    for index in range(200):
        image, caption, meta = draw_sample(0, "train", index)
        images.setdefault(meta["label"], []).append(image.tobytes())
        assert image.size == (32, 32) and image.mode == "RGB"
    assert all(len(set(group)) == len(group) for group in images.values())
    train_image, _, _ = draw_sample(0, "train", 5)
    test_image, _, _ = draw_sample(0, "test", 5)
    assert train_image.tobytes() != test_image.tobytes(), "test split is not a copy of train"


@pytest.mark.slow
def test_cli_writes_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "w"
    result = run_module("open_clip_safe.world", "--out", out, "--num-train", 20, "--num-test", 5,
                        "--shard-size", 8, "--format", "wds")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out / "train")) == ["000000.tar", "000001.tar", "000002.tar", "sizes.json"]
    assert not (out / "train.csv").exists()
    assert "world train" in result.stderr, "progress is shown"
    again = run_module("open_clip_safe.world", "--out", out, "--num-train", 20)
    assert again.returncode == 2 and "not empty; pass --overwrite" in again.stderr


@pytest.mark.parametrize("flags, message", [
    (["--num-train", "0"], "--num-train and --num-test must be at least 1"),
    (["--image-size", "8"], "--image-size must be at least 16"),
    (["--format", "zip"], "invalid choice: 'zip'"),
])
def test_cli_rejects_bad_arguments(tmp_path, flags, message, capsys):
    """In-process; test_cli_writes_and_refuses_to_overwrite runs the real process."""
    from open_clip_safe.world import main

    assert main(["--out", str(tmp_path / "w"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_tiles_world_has_its_own_classes_shapes_and_backgrounds(tmp_path):
    from open_clip_safe.world import TILE_CLASSES

    card = generate_world(tmp_path, num_train=40, num_test=8, seed=1, shard_size=20, formats=("wds",),
                          progress=False, style="tiles")
    assert card["style"] == "tiles" and card["classes"] == list(TILE_CLASSES)
    assert not set(TILE_CLASSES) & set(CLASSES)
    assert (tmp_path / "classnames.txt").read_text().split() == list(TILE_CLASSES)
    samples = [draw_sample(1, "train", index, style="tiles") for index in range(40)]
    for image, caption, meta in samples:
        assert meta["class"] in caption and meta["class"] == TILE_CLASSES[meta["label"]]
        pixels = np.asarray(image, dtype=np.int16)
        assert abs(int(pixels[0].mean()) - int(pixels[-1].mean())) > 10 or \
            abs(int(pixels[:, 0].mean()) - int(pixels[:, -1].mean())) > 10, "a gradient background"
    again = draw_sample(1, "train", 3, style="tiles")
    assert again[0].tobytes() == samples[3][0].tobytes() and again[1] == samples[3][1]
    assert draw_sample(1, "train", 3)[0].tobytes() != samples[3][0].tobytes(), "glyphs are another world"
