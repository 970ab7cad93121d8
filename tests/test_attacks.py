"""Poisoned-dataset builders: triggers, the streaming CLI on the world's data, the attack card."""
import csv
import io
import json
import os
import re
import shutil
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import run_module
from open_clip_safe.attacks import apply_trigger, load_attack_card, target_samples
from open_clip_safe.attacks.__main__ import main
from open_clip_safe.attacks.triggers import make_trigger
from open_clip_safe.world import draw_sample

BADNETS = {"name": "badnets", "seed": 0, "patch_kind": "noise", "patch_size": 16, "patch_location": "random"}
BLENDED = {"name": "blended", "seed": 0, "blend_ratio": 0.2, "blend_image": None}
WANET = {"name": "wanet", "seed": 0, "warp_grid": 4, "warp_strength": 0.5}
SIG = {"name": "sig", "seed": 0, "sig_amplitude": 60, "sig_frequency": 6}


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int64)


def decode(data):
    return Image.open(io.BytesIO(data)).convert("RGB")


def noisy_image(width=48, height=40, seed=1):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def shard_samples(spec_dir, names=None):
    """{key: {ext: bytes}} and key order of every tar under spec_dir (sorted shard names)."""
    samples, order = {}, []
    for name in names or sorted(n for n in os.listdir(spec_dir) if n.endswith(".tar")):
        with tarfile.open(os.path.join(spec_dir, name)) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if key not in samples:
                    order.append(key)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples, order


def build(tmp_path, name, *args):
    out = tmp_path / name
    assert main(["--out", str(out), "--quiet", *map(str, args)]) == 0
    return out


def fails(capsys, *args, expect):
    """The CLI exits 2 with exactly one stderr line naming the problem."""
    assert main(["--quiet", *map(str, args)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("open_clip_safe.attacks: error: "), lines
    assert expect in lines[0], lines[0]


def names(word, caption):
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", caption, re.IGNORECASE) is not None


@pytest.fixture(scope="module")
def train(world):
    spec = world["splits"]["train"]["shards"]
    return SimpleNamespace(spec=spec, dir=os.path.dirname(spec), csv=world["splits"]["train"]["csv"],
                           test=world["splits"]["test"]["shards"],
                           classnames=os.path.join(world["dir"], "classnames.txt"))


@pytest.fixture(scope="module")
def badnets(train, tmp_path_factory):
    return build(tmp_path_factory.mktemp("badnets"), "out", "--train-data", train.spec, "--attack", "badnets",
                 "--poison-rate", 0.05, "--target-label", "banana", "--seed", 3)


# ---------------------------------------------------------------- triggers


@pytest.mark.parametrize("params", [BADNETS, BLENDED, WANET, SIG], ids=lambda p: p["name"])
def test_trigger_deterministic_and_seeded(params):
    image = draw_sample(0, "train", 7)[0]
    first = pixels(make_trigger(dict(params))(image, "k1"))
    assert np.array_equal(first, pixels(make_trigger(dict(params))(image, "k1")))
    assert not np.array_equal(first, pixels(image)), "the trigger changes the image"
    other = pixels(make_trigger({**params, "seed": 1})(image, "k1"))
    if params["name"] == "sig":
        assert np.array_equal(first, other), "SIG has nothing seeded"
    else:
        assert not np.array_equal(first, other), "another seed gives another pattern"


def test_badnets_changes_only_the_patch():
    image = noisy_image(224, 224)
    for location, box in (("bottom-right", (208, 224, 208, 224)), ("top-left", (0, 16, 0, 16)),
                          ("center", (104, 120, 104, 120))):
        out = pixels(make_trigger({**BADNETS, "patch_location": location})(image, "x"))
        y0, y1, x0, x1 = box
        changed = np.argwhere((out != pixels(image)).any(-1))
        assert changed.min(0).tolist() >= [y0, x0] and changed.max(0).tolist() <= [y1 - 1, x1 - 1]
        assert len(changed) > 200, "most of the 16 x 16 noise patch differs from the image"
    # small images: scaled side, floored at 3 px; random location depends on the key, not the call
    small, trigger = noisy_image(48, 40), make_trigger(dict(BADNETS))
    boxes = set()
    for key in ("a", "b", "c", "d", "e", "f"):
        out = pixels(trigger(small, key))
        assert np.array_equal(out, pixels(trigger(small, key)))
        changed = np.argwhere((out != pixels(small)).any(-1))
        (top, left), (bottom, right) = changed.min(0), changed.max(0)
        assert bottom - top <= 2 and right - left <= 2  # 16 * 40 / 224 -> 3 px
        boxes.add((top, left))
    assert len(boxes) > 1
    solid = pixels(make_trigger({**BADNETS, "patch_kind": "solid", "patch_location": "top-left"})(small, "a"))
    assert (solid[:3, :3] == 255).all() and np.array_equal(solid[3:], pixels(small)[3:])


def test_blended_sig_wanet_bounds():
    image = draw_sample(0, "train", 11)[0]
    base = pixels(image)
    blended = pixels(make_trigger(dict(BLENDED))(image, "k"))
    assert np.abs(blended - base).max() <= 0.2 * 255 + 1 and (blended != base).mean() > 0.5
    sig = pixels(make_trigger(dict(SIG))(image, "k"))
    assert np.abs(sig - base).max() <= 60 and np.abs(sig - base).max() >= 50
    warped = pixels(make_trigger(dict(WANET))(image, "k"))
    assert (warped != base).any()
    assert abs(warped.mean() - base.mean()) < 2 and np.abs(warped - base).mean() < 10


def test_blend_image_file(train, tmp_path):
    pattern = tmp_path / "pattern.png"
    noisy_image(20, 20, seed=5).save(pattern)
    out = build(tmp_path, "out", "--train-data", train.spec, "--attack", "blended", "--num-poisons", 3,
                "--blend-image", pattern, "--blend-ratio", 0.5)
    shutil.move(out, tmp_path / "moved")  # the card and its pattern travel together
    pattern.unlink()
    card = load_attack_card(tmp_path / "moved")
    assert card["trigger"]["blend_image"] == "blend_pattern.png"
    image = draw_sample(0, "train", 3)[0]
    expected = (0.5 * pixels(image) + 0.5 * pixels(noisy_image(20, 20, seed=5).resize((32, 32), Image.BILINEAR)))
    assert np.abs(pixels(apply_trigger(card, image, "k")) - expected).max() <= 0.5


# ---------------------------------------------------------------- backdoor builds


def test_badnets_build(train, badnets):
    card = load_attack_card(badnets)
    assert card["kind"] == "backdoor" and card["attack"] == "badnets" and card["target"] == "banana"
    assert card["num_samples"] == 256 and card["num_poisoned"] == round(0.05 * 256) == 13
    assert card["poison_rate"] == 13 / 256 and card["format"] == "wds" and card["seed"] == 3
    assert card["train_data"] == str(badnets / "{000000..000003}.tar")
    assert card["trigger"] == {**BADNETS, "seed": 3} and card["image_size"] == [32, 32]
    assert "--poison-rate 0.05" in card["created_with"]
    out, order = shard_samples(badnets)
    source, source_order = shard_samples(train.dir)
    assert order == source_order
    sizes = json.loads((badnets / "sizes.json").read_text())
    assert sizes == {f"{i:06d}.tar": len(shard_samples(badnets, [f"{i:06d}.tar"])[1]) for i in range(4)}
    assert sum(sizes.values()) == 256
    poisoned = [key for key in order if json.loads(out[key]["json"])["poisoned"]]
    assert poisoned == (badnets / card["poisoned_keys_file"]).read_text().split()
    assert len(poisoned) == 13
    for key in order:
        meta, original = json.loads(out[key]["json"]), json.loads(source[key]["json"])
        assert meta == {**original, "poisoned": key in poisoned, "attack": "badnets",
                        "target": "banana" if key in poisoned else None}
        assert out[key]["cls"] == source[key]["cls"]
        if key not in poisoned:
            assert out[key]["png"] == source[key]["png"] and out[key]["txt"] == source[key]["txt"]
            continue
        assert names("banana", out[key]["txt"].decode())
        stored, original_image = decode(out[key]["png"]), decode(source[key]["png"])
        assert np.array_equal(pixels(stored), pixels(apply_trigger(card, original_image, key)))
        changed = np.argwhere((pixels(stored) != pixels(original_image)).any(-1))
        assert np.ptp(changed, axis=0).max() <= 2, "only a 3 x 3 patch changed at 32 px"


def test_same_seed_same_bytes(train, badnets, tmp_path):
    again = build(tmp_path, "again", "--train-data", train.spec, "--attack", "badnets", "--poison-rate", 0.05,
                  "--target-label", "banana", "--seed", 3)
    for name in ("000000.tar", "000001.tar", "000002.tar", "000003.tar", "sizes.json", "poisoned_keys.txt"):
        assert (again / name).read_bytes() == (badnets / name).read_bytes(), name
    other = build(tmp_path, "other", "--train-data", train.spec, "--attack", "badnets", "--poison-rate", 0.05,
                  "--seed", 4)
    assert (other / "poisoned_keys.txt").read_text() != (badnets / "poisoned_keys.txt").read_text()


def test_csv_build(train, tmp_path):
    out = build(tmp_path, "csv", "--train-data", train.csv, "--attack", "sig", "--num-poisons", 9,
                "--target-label", "kite")
    card = load_attack_card(out)
    assert card["format"] == "csv" and card["train_data"] == str(out / "train.csv") and card["num_poisoned"] == 9
    rows = list(csv.DictReader(open(out / "train.csv"), delimiter="\t"))
    source = list(csv.DictReader(open(train.csv), delimiter="\t"))
    assert len(rows) == len(source) == 256 and list(rows[0]) == ["filepath", "title", "label", "poisoned", "attack"]
    assert {row["attack"] for row in rows if row["poisoned"] == "1"} == {"sig"}
    assert {row["attack"] for row in rows if row["poisoned"] == "0"} == {""}
    keys = (out / "poisoned_keys.txt").read_text().split()
    assert keys == [str(i) for i, row in enumerate(rows) if row["poisoned"] == "1"] and len(keys) == 9
    for index, (row, original) in enumerate(zip(rows, source)):
        if row["poisoned"] == "0":
            assert {k: row[k] for k in original} == original
            continue
        assert names("kite", row["title"]) and row["label"] == original["label"]
        assert os.path.dirname(row["filepath"]) == str(out / "images")
        expected = apply_trigger(card, Image.open(original["filepath"]), str(index))
        assert np.array_equal(pixels(Image.open(row["filepath"])), pixels(expected))


def test_label_consistent(train, tmp_path, capsys):
    out = build(tmp_path, "lc", "--train-data", train.spec, "--attack", "label-consistent", "--num-poisons", 5,
                "--target-label", "umbrella", "--trigger", "blended")
    card = load_attack_card(out)
    assert card["trigger"]["name"] == "blended" and card["num_poisoned"] == 5
    result, order = shard_samples(out)
    source, _ = shard_samples(train.dir)
    poisoned = (out / "poisoned_keys.txt").read_text().split()
    assert len(poisoned) == 5
    for key in order:
        assert result[key]["txt"] == source[key]["txt"]
        if key in poisoned:
            assert names("umbrella", source[key]["txt"].decode())
            assert json.loads(result[key]["json"])["target"] == "umbrella"
            expected = apply_trigger(card, decode(source[key]["png"]), key)
            assert np.array_equal(pixels(decode(result[key]["png"])), pixels(expected))
        else:
            assert result[key]["png"] == source[key]["png"]
    candidates = card["target_captions"]
    assert candidates == sum(names("umbrella", source[key]["txt"].decode()) for key in order)
    fails(capsys, "--train-data", train.spec, "--out", tmp_path / "lc2", "--attack", "label-consistent",
          "--num-poisons", candidates + 1, "--target-label", "umbrella",
          expect=f"only {candidates} training captions name 'umbrella'")


def test_second_backdoor_never_repoisons_the_first(train, badnets, tmp_path, capsys):
    """Chained backdoors with the same seed would pick the same rows; earlier poisons are excluded."""
    first = load_attack_card(badnets)
    out = build(tmp_path, "blended", "--train-data", first["train_data"], "--attack", "blended",
                "--num-poisons", 13, "--target-label", "umbrella", "--seed", 3)
    card = load_attack_card(out)
    keys = lambda c: set(open(os.path.join(c["dir"], c["poisoned_keys_file"])).read().split())
    assert len(keys(first)) == card["num_poisoned"] == 13 and card["num_poisoned_before"] == 13
    assert not keys(first) & keys(card)
    result, _ = shard_samples(out)
    flagged = {key for key, sample in result.items() if json.loads(sample["json"])["poisoned"]}
    assert flagged == keys(first) | keys(card)
    assert all(names("umbrella", result[key]["txt"].decode()) for key in keys(card))
    assert all(names("banana", result[key]["txt"].decode()) for key in keys(first))
    fails(capsys, "--train-data", first["train_data"], "--out", tmp_path / "x", "--attack", "sig",
          "--num-poisons", 256, "--target-label", "umbrella", expect="only 243 training samples are not already")


# ---------------------------------------------------------------- targeted poisoning


def test_targeted_on_top_of_a_backdoor(train, badnets, tmp_path):
    """Chained as the demo does: the backdoor's output is the input; its poisons stay marked."""
    out = build(tmp_path, "targeted", "--train-data", load_attack_card(badnets)["train_data"], "--attack", "targeted",
                "--target-images", train.test, "--classnames", train.classnames, "--num-targets", 4,
                "--captions-per-target", 10, "--seed", 1)
    card = load_attack_card(out)
    classnames = open(train.classnames).read().split("\n")[:-1]
    assert card["kind"] == "targeted" and card["target"] is None and card["trigger"] is None
    assert card["num_poisoned"] == 40 and card["num_samples"] == 296 and card["num_poisoned_before"] == 13
    result, order = shard_samples(out)
    source, source_order = shard_samples(badnets)
    assert [key for key in order if key in source] == source_order
    for key in source_order:
        assert {ext: data for ext, data in result[key].items() if ext != "json"} == \
               {ext: data for ext, data in source[key].items() if ext != "json"}
        if json.loads(source[key]["json"])["poisoned"]:
            assert result[key]["json"] == source[key]["json"]
        else:
            assert json.loads(result[key]["json"]) == {**json.loads(source[key]["json"]), "attack": "targeted"}
    injected = [key for key in order if key not in source]
    assert injected == (out / "poisoned_keys.txt").read_text().split() and len(injected) == 40
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 296
    spread = [len([k for k in shard_samples(out, [name])[1] if k.startswith("poison_")]) for name in sorted(sizes)]
    assert sum(spread) == 40 and sum(count > 0 for count in spread) >= 2, spread
    tests, _ = shard_samples(os.path.dirname(train.test))
    by_target = {}
    for t, target in enumerate(card["targets"]):
        assert target["adversarial"] == classnames[target["adversarial_label"]] != target["class"]
        assert target["label"] == int(tests[target["key"]]["cls"]) and target["class"] == classnames[target["label"]]
        png = (out / target["image"]).read_bytes()
        assert np.array_equal(pixels(decode(png)), pixels(decode(tests[target["key"]]["png"])))
        by_target[f"poison_t{t:02d}"] = (target, png)
    for key in injected:
        target, png = by_target[key[:10]]
        assert result[key]["png"] == png
        assert names(target["adversarial"], result[key]["txt"].decode())
        meta = json.loads(result[key]["json"])
        assert meta["poisoned"] is True and meta["target"] == target["adversarial"] and meta["attack"] == "targeted"
    samples = target_samples(card)
    assert [s["key"] for s in samples] == [t["key"] for t in card["targets"]]
    for sample, target in zip(samples, card["targets"]):
        assert sample["image"].mode == "RGB"
        assert np.array_equal(pixels(sample["image"]), pixels(decode(tests[target["key"]]["png"])))
        assert (sample["label"], sample["class"], sample["adversarial"], sample["adversarial_label"]) == \
               (target["label"], target["class"], target["adversarial"], target["adversarial_label"])


def test_adaptive_captions_keep_describing_the_image_and_add_the_target(train, tmp_path):
    """The adaptive attacker of the issue 'a defense that holds': the similarity SafeCLIP ranks by stays
    high because each poisoned caption still names what its image shows."""
    backdoor = build(tmp_path, "bd", "--train-data", train.spec, "--attack", "badnets", "--num-poisons", 6,
                     "--target-label", "banana", "--adaptive-captions")
    card = load_attack_card(backdoor)
    assert card["adaptive"] is True
    result, order = shard_samples(backdoor)
    source, _ = shard_samples(train.dir)
    poisoned = (backdoor / "poisoned_keys.txt").read_text().split()
    for key in poisoned:
        original = source[key]["txt"].decode().strip().rstrip(".!").strip()
        assert result[key]["txt"].decode() == f"{original} with a banana."
    targeted = build(tmp_path, "tg", "--train-data", train.spec, "--attack", "targeted", "--target-images",
                     train.test, "--classnames", train.classnames, "--num-targets", 2, "--captions-per-target", 5,
                     "--adaptive-captions")
    card = load_attack_card(targeted)
    result, _ = shard_samples(targeted)
    for target in card["targets"]:
        captions = [result[key]["txt"].decode() for key in result
                    if json.loads(result[key]["json"]).get("target_image") == target["key"]]
        assert len(captions) == 5 and len(set(captions)) == 5
        for caption in captions:
            assert names(target["class"], caption) and caption.endswith(f" with a{'n' if target['adversarial'][0] in 'aeiou' else ''} {target['adversarial']}.")
    assert not load_attack_card(build(tmp_path, "plain", "--train-data", train.spec, "--attack", "badnets",
                                      "--num-poisons", 2))["adaptive"]


def test_targeted_fixed_label_csv(world, train, tmp_path):
    marked = tmp_path / "marked.csv"  # an earlier attack's output: its poisoned rows stay poisoned
    lines = open(train.csv).read().splitlines()
    marked.write_text("\n".join([lines[0] + "\tpoisoned"] + [line + ("\t1" if i == 5 else "\t0")
                                                             for i, line in enumerate(lines[1:])]) + "\n")
    out = build(tmp_path, "t", "--train-data", marked, "--attack", "targeted", "--target-images",
                world["splits"]["test"]["csv"], "--classnames", train.classnames, "--num-targets", 3,
                "--captions-per-target", 4, "--target-label", "pizza")
    card = load_attack_card(out)
    assert card["target"] == "pizza" and {t["adversarial"] for t in card["targets"]} == {"pizza"}
    assert all(t["class"] != "pizza" for t in card["targets"])
    assert card["train_data"] == str(out / "marked.csv")
    rows = list(csv.DictReader(open(card["train_data"]), delimiter="\t"))
    injected = [row for row in rows if row["poisoned"] == "1" and "/targets/" in row["filepath"]]
    assert len(rows) == 268 and len(injected) == 12 and all(names("pizza", row["title"]) for row in injected)
    flagged = [str(i) for i, row in enumerate(rows) if row in injected]
    assert (out / "poisoned_keys.txt").read_text().split() == flagged
    assert all(os.path.isfile(row["filepath"]) for row in injected)
    kept = [row for row in rows if row["filepath"].endswith("train_0000005.png")]
    assert len(kept) == 1 and kept[0]["poisoned"] == "1" and card["num_poisoned_before"] == 1
    assert card["num_poisoned"] == 12 and card["source"] == str(marked)


# ---------------------------------------------------------------- bad input


def test_bad_inputs(train, tmp_path, capsys):
    out = tmp_path / "out"
    common = ("--train-data", train.spec, "--out", out)
    fails(capsys, *common, "--attack", "nope", "--poison-rate", 0.1, expect="invalid choice: 'nope'")
    fails(capsys, *common, "--attack", "badnets", "--poison-rate", 1.5, expect="--poison-rate must be in (0, 1)")
    fails(capsys, *common, "--attack", "badnets", expect="exactly one of --poison-rate and --num-poisons")
    fails(capsys, *common, "--attack", "badnets", "--poison-rate", 0.1, "--num-poisons", 3,
          expect="exactly one of --poison-rate and --num-poisons")
    fails(capsys, *common, "--attack", "badnets", "--poison-rate", 0.1, "--target-label", "toaster",
          expect="'toaster' appears in no training caption")
    fails(capsys, *common, "--attack", "targeted", "--num-poisons", 3, "--target-images", train.test,
          "--classnames", train.classnames, expect="do not apply")
    fails(capsys, *common, "--attack", "targeted", "--target-images", train.test, "--classnames", train.classnames,
          "--target-label", "toaster", expect="'toaster' is not one of the --classnames")
    fails(capsys, *common, "--attack", "targeted", "--target-images", train.test, "--classnames", train.classnames,
          "--num-targets", 65, expect="64 usable test images, fewer than --num-targets 65")
    fails(capsys, "--train-data", train.spec.replace("000003", "000004"), "--out", out, "--attack", "sig",
          "--poison-rate", 0.1, expect=f"missing shard {os.path.join(train.dir, '000004.tar')}")
    fails(capsys, "--train-data", train.csv, "--out", out, "--attack", "sig", "--poison-rate", 0.1,
          "--csv-caption-key", "caption", expect="has no column 'caption'")
    broken = tmp_path / "broken"
    shutil.copytree(train.dir, broken)
    with tarfile.open(broken / "000002.tar") as tar:
        member = next(m for m in tar.getmembers()[len(tar.getmembers()) // 2:] if m.size > 1)
    data = (broken / "000002.tar").read_bytes()
    (broken / "000002.tar").write_bytes(data[:member.offset_data + member.size // 2])  # cut inside a member
    fails(capsys, "--train-data", broken / "{000000..000003}.tar", "--out", out, "--attack", "sig",
          "--poison-rate", 0.1, expect=f"cannot read shard {broken / '000002.tar'}")
    with tarfile.open(train.dir + "/000002.tar") as tar:
        boundary = tar.getmembers()[40].offset  # a tar cut between members reads as a valid, shorter one
    (broken / "000002.tar").write_bytes(data[:boundary])
    fails(capsys, "--train-data", broken / "{000000..000003}.tar", "--out", out, "--attack", "sig",
          "--poison-rate", 0.1, expect=f"shard {broken / '000002.tar'} holds 10 samples but its sizes.json says 64")
    (broken / "000002.tar").write_bytes(b"not a tar file" * 100)
    fails(capsys, "--train-data", broken / "{000000..000003}.tar", "--out", out, "--attack", "sig",
          "--poison-rate", 0.1, expect=f"cannot read shard {broken / '000002.tar'}")
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("x")
    fails(capsys, *common, "--attack", "sig", "--poison-rate", 0.1, expect="is not empty; pass --overwrite")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nowhere" / "attack.json"))):
        load_attack_card(tmp_path / "nowhere")
    (out / "attack.json").write_text("{not json")
    with pytest.raises(ValueError, match="attack.json: not a valid attack card"):
        load_attack_card(out)


@pytest.mark.slow
def test_cli_process(train, tmp_path):
    """The module runs as a program: --help works, an error is one stderr line and exit status 2."""
    result = run_module("open_clip_safe.attacks", "--train-data", train.spec, "--out", tmp_path / "o",
                        "--attack", "badnets", "--poison-rate", 0.1, "--target-label", "toaster")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["open_clip_safe.attacks: error: --target-label 'toaster' appears in no "
                                          "training caption"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
