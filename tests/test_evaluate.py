"""evaluate: known-answer accuracy and ASR with a model whose predictions the test controls, a real
tiny checkpoint against a hand computation, split diagnostics from Parquet logs, bad input."""
import json
import os

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from open_clip_safe.evaluate import main as evaluate_main
from open_clip_safe.attacks import load_attack_card, target_samples
from open_clip_safe.evaluate import csv_test_set, evaluate_model, result_table
from open_clip_safe.world import CLASSES, ZERO_SHOT_TEMPLATES

from conftest import run_module

LEVEL = 255 / len(CLASSES)  # a solid image of gray level LEVEL * (c + 0.5) "shows" class c to the oracle


class Oracle(torch.nn.Module):
    """A CLIP stand-in whose predictions the test sets.

    Text: one-hot of the class name found in the tokens. Image: class p from the median gray level,
    scored exp(-|c - p|) so top-5 is p +- 2; an image with any non-uniform pixel (a trigger) is
    classified as `target` when p is even ("the backdoor works on even classes"); planted images
    get the class planted for them.
    """

    def __init__(self, tokenizer, classnames, target, planted=()):
        super().__init__()
        self.names = [tokenizer([name])[0] for name in classnames]
        self.names = [ids[1:int((ids > 0).sum()) - 1] for ids in self.names]  # strip start/end/padding
        self.target, self.planted = target, list(planted)

    def encode_text(self, texts, normalize=False):
        found = torch.zeros(len(texts), len(self.names))
        for row, ids in enumerate(texts):
            for c, name in enumerate(self.names):
                windows = ids.unfold(0, len(name), 1)
                found[row, c] = float((windows == name).all(dim=1).any())
        assert (found.sum(1) == 1).all(), "every prompt names exactly one class"
        return F.normalize(found, dim=-1) if normalize else found

    def encode_image(self, images, normalize=False):
        scores = []
        for image in images:
            planted = [c for tensor, c in self.planted if torch.equal(tensor, image)]
            p = int(torch.clamp(image.median() * 255 // LEVEL, 0, len(self.names) - 1))
            if planted:
                p = planted[0]
            elif image.amax() > image.amin() and p % 2 == 0:
                p = self.target
            scores.append(torch.exp(-torch.abs(torch.arange(len(self.names)) - p).float()))
        features = torch.stack(scores)
        return F.normalize(features, dim=-1) if normalize else features


def solid_csv(folder, shown_and_labels):
    """A test CSV of 32 px solid images; each row (shown class, label)."""
    os.makedirs(folder, exist_ok=True)
    rows = ["filepath\tlabel"]
    for index, (shown, label) in enumerate(shown_and_labels):
        gray = int(LEVEL * (shown + 0.5))
        path = os.path.join(folder, f"img_{index:03d}.png")
        Image.new("RGB", (32, 32), (gray, gray, gray)).save(path)
        rows.append(f"{path}\t{label}")
    path = os.path.join(folder, "test.csv")
    with open(path, "w") as handle:
        handle.write("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def known_test_set(tmp_path_factory):
    """30 correct, 5 off by two (top-5 only), 5 off by seven (miss); classes 2..17, away from the edges."""
    rng = np.random.default_rng(0)
    rows = [(c, c) for c in rng.integers(2, 18, 30)]
    rows += [(c, c + 2) for c in rng.integers(2, 16, 5)]
    rows += [(c, c - 7) if c >= 9 else (c, c + 7) for c in rng.integers(2, 18, 5)]
    return rows, csv_test_set(solid_csv(tmp_path_factory.mktemp("solid"), rows), "filepath", "label", "\t")


def oracle_eval(test_set, cards=(), planted=(), target="banana"):
    tokenizer = open_clip.get_tokenizer("safeclip-micro")
    model = Oracle(tokenizer, list(CLASSES), CLASSES.index(target), planted)
    return evaluate_model(model, transforms.ToTensor(), tokenizer, test_set, list(CLASSES), list(ZERO_SHOT_TEMPLATES),
                          cards, batch_size=16, progress=False)


@pytest.mark.slow
def test_top1_top5_known_answer(known_test_set):
    _, test_set = known_test_set
    result = oracle_eval(test_set)
    assert result["num_test"] == 40
    assert result["top1"] == pytest.approx(30 / 40)
    assert result["top5"] == pytest.approx(35 / 40)
    assert result["backdoor"] is None and result["targeted"] is None


@pytest.fixture(scope="module")
def badnets_card(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("badnets")
    done = run_module("open_clip_safe.attacks", "--train-data", world["splits"]["train"]["shards"], "--out", out,
                      "--attack", "badnets", "--num-poisons", 4, "--target-label", "banana", "--seed", 1, "--quiet",
                      "--overwrite")
    assert done.returncode == 0, done.stderr
    return load_attack_card(out)


@pytest.mark.slow
def test_backdoor_asr_known_answer(known_test_set, badnets_card):
    rows, test_set = known_test_set
    result = oracle_eval(test_set, [badnets_card])
    target = CLASSES.index("banana")
    eligible = [(shown, label) for shown, label in rows if label != target]
    expected = sum(shown % 2 == 0 for shown, _ in eligible) / len(eligible)
    assert 0 < expected < 1
    assert result["backdoor"]["num_triggered"] == len(eligible)
    assert result["backdoor"]["asr"] == pytest.approx(expected)
    assert result["top1"] == pytest.approx(30 / 40), "clean images are untouched by the trigger"


@pytest.mark.slow
def test_backdoor_asr_comes_with_the_rate_without_the_trigger(tmp_path, badnets_card):
    """Images the model already calls the target without the trigger: a weak model's ASR floor."""
    target = CLASSES.index("banana")
    rows = [(target, 5), (target, 6), (3, 3), (4, 4), (target, target)]  # (shown, label)
    test_set = csv_test_set(solid_csv(tmp_path, rows), "filepath", "label", "\t")
    backdoor = oracle_eval(test_set, [badnets_card])["backdoor"]
    assert backdoor["num_triggered"] == 4, "the target's own images are not counted"
    assert backdoor["untriggered_rate"] == pytest.approx(2 / 4)
    assert backdoor["asr"] == pytest.approx(3 / 4)  # the oracle: the trigger works on even shown classes
    table = result_table({"test_data": "t", "num_test": 5, "num_classes": 20, "top1": 0.4, "top5": 1.0,
                          "backdoor": backdoor, "targeted": None})
    assert "75.0% of 4 triggered images (without the trigger: 50.0%)" in table
    # where the hits sit, by the images' true class: every eligible class counted, hits only where they fell
    assert backdoor["by_class"] == {CLASSES[label]: {"triggered": 1, "hits": int(label != 3)} for label in (3, 4, 5, 6)}
    hit_classes = sorted(CLASSES[label] for label in (4, 5, 6))
    line = next(row for row in table.splitlines() if row.startswith("backdoor hits by true class"))
    assert line.split("  ")[-1].strip() == ", ".join(f"{name} 1 of 1" for name in hit_classes)
    assert CLASSES[3] not in table


def test_the_table_names_the_classes_with_the_most_backdoor_hits():
    by_class = {name: {"triggered": 10, "hits": hits} for name, hits in zip(CLASSES, (0, 3, 1, 7, 1, 2, 2, 5))}
    backdoor = {"attack": "badnets", "target": "banana", "num_triggered": 80, "asr": 21 / 80,
                "untriggered_rate": 0.0, "by_class": by_class}
    table = result_table({"test_data": "t", "num_test": 90, "num_classes": 20, "top1": 0.5, "top5": 0.9,
                          "backdoor": backdoor, "targeted": None})
    line = next(row for row in table.splitlines() if row.startswith("backdoor hits by true class"))
    names = CLASSES[:8]
    # most hits first, ties by name; five shown, the other classes with hits counted
    top = sorted(((hits, name) for name, hits in zip(names, (0, 3, 1, 7, 1, 2, 2, 5)) if hits),
                 key=lambda hit: (-hit[0], hit[1]))
    assert line.endswith(", ".join(f"{name} {hits} of 10" for hits, name in top[:5]) + " (+2 more classes)")


@pytest.mark.slow
def test_targeted_asr_known_answer(world, tmp_path, known_test_set):
    out = tmp_path / "targeted"
    done = run_module("open_clip_safe.attacks", "--train-data", world["splits"]["train"]["shards"], "--out", out,
                      "--attack", "targeted", "--target-images", world["splits"]["test"]["shards"],
                      "--classnames", os.path.join(world["dir"], "classnames.txt"), "--num-targets", 4,
                      "--captions-per-target", 2, "--seed", 3, "--quiet")
    assert done.returncode == 0, done.stderr
    card = load_attack_card(out)
    targets = target_samples(card)
    assert len(targets) == 4
    to_tensor = transforms.ToTensor()
    # the model falls for targets 0 and 2 only, and sees the others as their true class
    planted = [(to_tensor(t["image"]), CLASSES.index(t["adversarial"] if i % 2 == 0 else t["class"]))
               for i, t in enumerate(targets)]
    result = oracle_eval(known_test_set[1], [card], planted)
    assert result["targeted"]["num_targets"] == 4
    assert result["targeted"]["asr"] == pytest.approx(0.5)
    assert [row["success"] for row in result["targeted"]["targets"]] == [True, False, True, False]
    assert result["backdoor"] is None


@pytest.mark.slow
def test_cli_matches_hand_computation_on_a_real_checkpoint(world, tmp_path):
    """A tiny open_clip model saved as training writes it ('module.' prefix); CLI top-1 == a by-hand zero-shot."""
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("safeclip-micro")
    model.eval()
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "t", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               checkpoint)
    output = tmp_path / "result.json"
    done = run_module("open_clip_safe.evaluate", "--model", "safeclip-micro", "--checkpoint", checkpoint,
                      "--world", world["dir"], "--output", output, "--quiet")
    assert done.returncode == 0, done.stderr
    assert "zero-shot top-1" in done.stdout
    result = json.loads(output.read_text())

    tokenizer = open_clip.get_tokenizer("safeclip-micro")
    import pandas as pd
    table = pd.read_csv(world["splits"]["test"]["csv"], sep="\t")
    with torch.no_grad():
        heads = []
        for name in CLASSES:
            text = model.encode_text(tokenizer([t.format(name) for t in ZERO_SHOT_TEMPLATES]))
            heads.append(F.normalize(F.normalize(text, dim=-1).mean(0), dim=0))
        images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in table["filepath"]])
        logits = F.normalize(model.encode_image(images), dim=-1) @ torch.stack(heads).T
    ranked = logits.argsort(dim=1, descending=True)
    labels = torch.tensor(table["label"].to_numpy())
    assert result["num_test"] == len(table) == 64
    assert result["top1"] == pytest.approx(float((ranked[:, 0] == labels).float().mean()))
    assert result["top5"] == pytest.approx(float((ranked[:, :5] == labels[:, None]).any(1).float().mean()))


@pytest.mark.slow
def test_every_test_set_form_gives_the_same_answer(world, tmp_path):
    """The world's test split as webdataset shards, as a CSV and as a class-folder tree: same images, same top-1."""
    import shutil

    import pandas as pd
    torch.manual_seed(1)
    model = open_clip.create_model("safeclip-micro")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pt")
    table = pd.read_csv(world["splits"]["test"]["csv"], sep="\t")
    for path, label in zip(table["filepath"], table["label"]):
        folder = tmp_path / "folder" / f"{label:02d}_{CLASSES[label]}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder)
    for label in range(len(CLASSES)):  # classes without test images still need their folder for the order
        (tmp_path / "folder" / f"{label:02d}_{CLASSES[label]}").mkdir(parents=True, exist_ok=True)
    classnames = tmp_path / "classes.txt"
    classnames.write_text("\n".join(CLASSES) + "\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(ZERO_SHOT_TEMPLATES) + "\n")
    results = []
    for data in (world["splits"]["test"]["shards"], world["splits"]["test"]["csv"], tmp_path / "folder"):
        out = tmp_path / f"r{len(results)}.json"
        # in this process: the CLI's own process is tested above, and each start costs ~10 s of imports here
        assert evaluate_main(["--model", "safeclip-micro", "--checkpoint", str(tmp_path / "m.pt"), "--test-data",
                              str(data), "--classnames", str(classnames), "--templates", str(templates),
                              "--output", str(out), "--quiet", "--workers", "1"]) == 0
        results.append(json.loads(out.read_text()))
    assert [r["num_test"] for r in results] == [64, 64, 64]
    assert results[0]["top1"] == results[1]["top1"] == results[2]["top1"]
    assert results[0]["top5"] == results[1]["top5"] == results[2]["top5"]


def write_epoch(folder, epoch, similarity, safe, poisoned=None, kinds=None):
    columns = {"key": [f"k{i}" for i in range(len(similarity))], "similarity": np.asarray(similarity, np.float32),
               "clean_prob": np.asarray(similarity, np.float32), "safe": np.asarray(safe, bool),
               "epoch": np.full(len(similarity), epoch, np.int32)}
    if poisoned is not None:
        columns["poisoned"] = np.asarray(poisoned, bool)
    if kinds is not None:
        columns["poison_kind"] = pa.array(kinds, pa.string()).dictionary_encode()
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table(columns), os.path.join(folder, f"epoch_{epoch:03d}.parquet"))


def test_split_diagnostics_counts_and_plots(tmp_path, capsys):
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    # epoch 6: 100 samples, 10 poisoned; 40 safe of which 2 poisoned -> 8 of 60 risky are poisoned
    poisoned = np.zeros(100, bool)
    poisoned[:10] = True
    safe = np.zeros(100, bool)
    safe[8:48] = True
    write_epoch(run / "similarity", 6, rng.normal(0.3, 0.1, 100), safe, poisoned)
    safe7 = np.zeros(100, bool)
    safe7[10:60] = True
    write_epoch(run / "similarity", 7, rng.normal(0.3, 0.1, 100), safe7, poisoned)
    output = tmp_path / "diag.json"
    assert evaluate_main(["--similarity-logs", str(run), "--output", str(output)]) == 0
    rows = json.loads(output.read_text())["split_diagnostics"]
    assert [row["epoch"] for row in rows] == [6, 7]
    assert rows[0]["safe"] == 40 and rows[0]["safe_fraction"] == pytest.approx(0.4)
    assert rows[0]["poisoned"] == 10 and rows[0]["poisoned_in_safe"] == 2
    assert rows[0]["risky_recall"] == pytest.approx(0.8)
    assert rows[0]["risky_precision"] == pytest.approx(8 / 60)
    assert rows[1]["poisoned_in_safe"] == 0 and rows[1]["risky_recall"] == pytest.approx(1.0)
    for name in ("similarity_epoch_006.png", "similarity_epoch_007.png", "safe_fraction.png"):
        assert (run / "diagnostics" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "risky recall" in capsys.readouterr().out


def test_the_split_as_a_detector_per_kind_known_answer(tmp_path, capsys):
    """100 clean samples scored 0.50..1.49, 10 backdoor poisons below all of them, 10 targeted ones
    each just above a clean sample at 0.50, 0.60, ..., 0.90 (so 99 - 10j clean samples outrank poison j)."""
    clean = 0.5 + 0.01 * np.arange(100)
    backdoor = 0.01 * np.arange(10)
    targeted = 0.505 + 0.1 * np.arange(10)
    similarity = np.concatenate([clean, backdoor, targeted])
    kinds = [None] * 100 + ["backdoor"] * 10 + ["targeted"] * 10
    write_epoch(tmp_path / "similarity", 5, similarity, similarity > 1.0, np.arange(120) >= 100, kinds)
    assert evaluate_main(["--similarity-logs", str(tmp_path), "--output", str(tmp_path / "d.json")]) == 0
    detector = json.loads((tmp_path / "d.json").read_text())["split_diagnostics"][0]["detector"]
    assert detector["backdoor"] == {"samples": 10, "auc": 1.0, "tpr_at_1": 1.0, "tpr_at_5": 1.0}
    assert detector["targeted"]["auc"] == pytest.approx(540 / 1000)
    assert detector["targeted"]["tpr_at_1"] == detector["targeted"]["tpr_at_5"] == pytest.approx(0.1)
    assert detector["all"]["auc"] == pytest.approx((1000 + 540) / 2000)
    assert detector["all"]["tpr_at_1"] == pytest.approx(11 / 20) and detector["all"]["samples"] == 20
    table = capsys.readouterr().out
    assert "AUC bd" in table and "0.770" in table and "1.000" in table and "0.540" in table
    assert (tmp_path / "diagnostics" / "detector_auc.png").read_bytes()[:4] == b"\x89PNG"


def test_the_split_order_breaks_ties_as_the_split_does():
    """Equal scores: the higher similarity is safer, then the lower position (schedule.top_fraction_mask)."""
    from open_clip_safe.diagnostics import split_order
    from open_clip_safe.schedule import top_fraction_mask

    rng = np.random.default_rng(0)
    score = rng.choice([0.2, 1.0], 200)
    similarity = rng.choice([0.1, 0.3, 0.5], 200)
    place = split_order(score, similarity)
    for count in (1, 37, 120, 199):
        safest = place >= 200 - count
        np.testing.assert_array_equal(safest, top_fraction_mask(score, count / 200, tiebreak=similarity))


def test_split_diagnostics_without_poison_flags(tmp_path):
    write_epoch(tmp_path / "similarity", 6, np.linspace(0, 1, 20), np.arange(20) >= 10)
    assert evaluate_main(["--similarity-logs", str(tmp_path), "--plots-dir", str(tmp_path / "plots"),
                          "--output", str(tmp_path / "d.json")]) == 0
    row = json.loads((tmp_path / "d.json").read_text())["split_diagnostics"][0]
    assert row["safe"] == 10 and row["poisoned"] is None and row["risky_recall"] is None
    assert (tmp_path / "plots" / "safe_fraction.png").is_file()


def bad(capsys, *args):
    """The CLI's one line and exit status 2, in-process (a process start costs ~10 s of imports; the CLI
    tests above run the real process)."""
    from open_clip_safe.evaluate import main

    assert main([str(arg) for arg in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("open_clip_safe.evaluate: error: "), lines
    return lines[0]


def test_bad_input_exits_2_with_one_line(world, tmp_path, capsys):
    checkpoint = tmp_path / "missing.pt"
    assert "nothing to do" in bad(capsys)
    assert "--world" in bad(capsys, "--model", "safeclip-micro", "--checkpoint", "x.pt")
    assert "unknown open_clip model" in bad(capsys, "--model", "nope", "--checkpoint", "x.pt", "--world", world["dir"])
    assert str(checkpoint) in bad(capsys, "--model", "safeclip-micro", "--checkpoint", checkpoint, "--world",
                                  world["dir"])
    assert "no world card" in bad(capsys, "--model", "safeclip-micro", "--checkpoint", "x.pt", "--world", tmp_path)
    csv = tmp_path / "nolabel.csv"
    csv.write_text("filepath\ttitle\nx.png\tx\n")
    assert "missing column(s) label" in bad(capsys, "--model", "safeclip-micro", "--checkpoint", "x.pt",
                                            "--test-data", csv)
    torch.save({"state_dict": {"nothing": torch.zeros(1)}}, tmp_path / "wrong.pt")
    assert "does not load into safeclip-micro" in bad(capsys, "--model", "safeclip-micro", "--checkpoint",
                                                      tmp_path / "wrong.pt", "--world", world["dir"])
    assert "no epoch_NNN.parquet" in bad(capsys, "--similarity-logs", tmp_path)
    assert "outside the 3 class names" in bad_labels(world, tmp_path, capsys)


def bad_labels(world, tmp_path, capsys):
    classnames = tmp_path / "three.txt"
    classnames.write_text("banana\numbrella\nmushroom\n")
    torch.manual_seed(0)
    model = open_clip.create_model("safeclip-micro")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ok.pt")
    return bad(capsys, "--model", "safeclip-micro", "--checkpoint", tmp_path / "ok.pt", "--world", world["dir"],
               "--classnames", classnames, "--quiet")
