"""SafeCLIP end to end: two processes through all three phases on a poisoned world, and resume."""
import os
import re
import shutil

import open_clip
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_cli, run_module

EPOCHS = 5  # 1 in-modal + 1 cross-modal warm-up epoch, then 3 mixed epochs


def safeclip_flags(train_data, logs, name, extra=()):
    return ["--train-data", train_data, "--model", "safeclip-micro", "--device", "cpu", "--precision", "fp32",
            "--batch-size", "16", "--epochs", str(EPOCHS), "--workers", "1", "--lr", "1e-3", "--seed", "0",
            "--log-every-n-steps", "4", "--logs", str(logs), "--name", name, "--save-frequency", "1",
            "--safeclip", "--safeclip-inmodal-epochs", "1", "--safeclip-crossmodal-epochs", "1",
            "--safeclip-filter-lr", "1e-4", "--safeclip-safe-fraction-step", "0.25",
            "--safeclip-safe-fraction-max", "0.6", "--safeclip-memory-bank-size", "64",
            # the authors' views and EDA captions: the paths these tests were written for
            "--safeclip-image-aug", "safeclip", "--safeclip-text-aug", "eda", *extra]


def phases_logged(log):
    return {int(e): p for e, p in re.findall(r"SafeCLIP epoch (\d+): (\w+) phase", log)}


def source_of(path):
    return pq.read_schema(path).metadata[b"similarity_source"].decode()


@pytest.mark.slow
def test_two_processes_through_all_phases_in_fast_mode(poisoned_world, tmp_path, wordnet):
    """torchrun, two ranks, --safeclip-fast: the first split from a pass, the next two from the training
    steps' cosines (rows stay with their keys); a resume before the last epoch takes a real pass."""
    result = run_cli([shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "--",
                      "open_clip_safe.main", *safeclip_flags(poisoned_world["shards"], tmp_path, "e2e",
                                                             ["--safeclip-fast"])], timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    run = tmp_path / "e2e"
    log = (run / "out.log").read_text()
    assert phases_logged(log) == {0: "inmodal", 1: "crossmodal", 2: "mixed", 3: "mixed", 4: "mixed"}

    n = poisoned_world["num_samples"]
    tables, fractions = {}, []
    for epoch in (2, 3, 4):
        table = pq.read_table(run / "similarity" / f"epoch_{epoch:03d}.parquet").to_pandas()
        assert len(table) == n and table["key"].is_unique
        assert table["poisoned"].sum() == poisoned_world["num_poisoned"]
        assert (table["epoch"] == epoch).all()
        fractions.append(table["safe"].mean())
        tables[epoch] = table.set_index("key")
    first = fractions[0]
    assert fractions[1] == min(0.6, int((first + 0.25) * n) / n) or abs(fractions[1] - min(0.6, first + 0.25)) <= 1 / n
    assert abs(fractions[2] - min(0.6, first + 0.5)) <= 1 / n
    assert re.search(rf"SafeCLIP epoch 2: similarity pass [\d.]+s over {n} samples; safe fraction", log)
    assert [source_of(run / "similarity" / f"epoch_{e:03d}.parquet") for e in (2, 3, 4)] == ["pass", "training",
                                                                                            "training"]
    for epoch in (3, 4):
        assert f"similarity pass (epoch {epoch})" not in log
        refreshed = int(re.search(rf"SafeCLIP epoch {epoch}: similarities from the last epoch's training steps "
                                  rf"\(--safeclip-fast; (\d+) of {n} refreshed", log).group(1))
        assert n - 2 * 32 < refreshed <= n  # all but each sub-epoch's remainder of a global batch (2 x 16)
        table = tables[epoch].loc[tables[2].index]
        assert table["poisoned"].equals(tables[2]["poisoned"])  # rows stay with their keys
        assert (table["similarity"] != tables[epoch - 1].loc[tables[2].index]["similarity"]).sum() > n // 2
    assert re.search(r"Train Epoch: 4 risky", log) and re.search(r"Train Epoch: 4 safe", log)

    checkpoint = torch.load(run / "checkpoints" / f"epoch_{EPOCHS}.pt", map_location="cpu")
    state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    path = tmp_path / "plain.pt"
    torch.save(state, path)
    model, _, _ = open_clip.create_model_and_transforms("safeclip-micro", pretrained=str(path))
    assert torch.equal(model.logit_scale.detach(), state["logit_scale"])

    # stopped after epoch 4 of 5 and resumed: the kept cosines are gone, so epoch 4's split takes a pass
    for folder in ("checkpoints", "safeclip_state"):
        (tmp_path / "resumed" / "e2e" / folder).mkdir(parents=True)
        shutil.copy(run / folder / "epoch_4.pt", tmp_path / "resumed" / "e2e" / folder / "epoch_4.pt")
    resumed = run_module("open_clip_safe.main", *safeclip_flags(poisoned_world["shards"], tmp_path / "resumed", "e2e",
                                                                ["--safeclip-fast"]), "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (tmp_path / "resumed" / "e2e" / "out.log").read_text()
    assert re.search(rf"SafeCLIP epoch 4: similarity pass [\d.]+s over {n} samples", log)
    assert source_of(tmp_path / "resumed" / "e2e" / "similarity" / "epoch_004.parquet") == "pass"


def final_state(run_dir, epoch):
    checkpoint = torch.load(run_dir / "checkpoints" / f"epoch_{epoch}.pt", map_location="cpu")
    return checkpoint["state_dict"], torch.load(run_dir / "safeclip_state" / f"epoch_{epoch}.pt",
                                                map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def full_run(poisoned_world, tmp_path_factory, wordnet):
    """An uninterrupted run with a checkpoint and SafeCLIP state after every epoch."""
    logs = tmp_path_factory.mktemp("full")
    full = run_module("open_clip_safe.main", *safeclip_flags(poisoned_world["shards"], logs, "full"), timeout=600)
    assert full.returncode == 0, full.stderr[-4000:]
    return logs / "full"


def assert_resumed_run_matches(full, resumed_dir, epochs_after):
    weights_full, state_full = final_state(full, EPOCHS)
    weights_resumed, state_resumed = final_state(resumed_dir, EPOCHS)
    assert state_full["schedule"] == state_resumed["schedule"]
    assert state_full["global_step"] == state_resumed["global_step"]
    for key in weights_full:
        assert torch.equal(weights_full[key], weights_resumed[key]), key
    for epoch in epochs_after:
        name = f"epoch_{epoch:03d}.parquet"
        a = pq.read_table(full / "similarity" / name).to_pandas().sort_values("key")
        b = pq.read_table(resumed_dir / "similarity" / name).to_pandas().sort_values("key")
        assert a.reset_index(drop=True).equals(b.reset_index(drop=True))


@pytest.mark.slow
def test_resume_after_a_mixed_epoch_matches_an_uninterrupted_run(poisoned_world, full_run, tmp_path):
    """Stop after epoch 3 (the first mixed epoch is epoch index 2), resume, compare with the full run."""
    # the interrupted run: only what a run stopped after its third epoch would have left behind
    for folder in ("checkpoints", "safeclip_state"):
        (tmp_path / "stopped" / folder).mkdir(parents=True)
        shutil.copy(full_run / folder / "epoch_3.pt", tmp_path / "stopped" / folder / "epoch_3.pt")
    resumed = run_module("open_clip_safe.main", *safeclip_flags(poisoned_world["shards"], tmp_path, "stopped"),
                         "--resume", "latest", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    log = (tmp_path / "stopped" / "out.log").read_text()
    assert "resumed schedule state" in log and phases_logged(log) == {3: "mixed", 4: "mixed"}
    assert_resumed_run_matches(full_run, tmp_path / "stopped", (3, 4))


@pytest.mark.slow
def test_resume_latest_skips_a_cut_checkpoint_and_one_without_its_state(poisoned_world, full_run, tmp_path):
    """A kill or a full disk during the save of epoch 5 left it cut in half, and epoch 4's SafeCLIP state
    is gone: `--resume latest` warns about both, continues from epoch 3 and ends as the full run did."""
    for folder in ("checkpoints", "safeclip_state"):
        (tmp_path / "cut" / folder).mkdir(parents=True)
        for epoch in range(1, EPOCHS + 1):
            shutil.copy(full_run / folder / f"epoch_{epoch}.pt", tmp_path / "cut" / folder / f"epoch_{epoch}.pt")
    cut = tmp_path / "cut" / "checkpoints" / f"epoch_{EPOCHS}.pt"
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
    os.remove(tmp_path / "cut" / "safeclip_state" / f"epoch_{EPOCHS - 1}.pt")
    resumed = run_module("open_clip_safe.main", *safeclip_flags(poisoned_world["shards"], tmp_path, "cut"),
                         "--resume", "latest", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    log = (tmp_path / "cut" / "out.log").read_text()
    assert re.search(rf"WARNING \| --resume latest: skipping \S+/epoch_{EPOCHS}.pt: cut short", log)
    assert re.search(rf"WARNING \| --resume latest: skipping \S+/epoch_{EPOCHS - 1}.pt: its SafeCLIP state is "
                     rf"missing", log)
    assert "epoch_3.pt' (epoch 3)" in log and phases_logged(log) == {3: "mixed", 4: "mixed"}
    assert_resumed_run_matches(full_run, tmp_path / "cut", (3, 4))


@pytest.mark.slow
def test_resume_without_safeclip_state_is_refused(poisoned_world, full_run, tmp_path, train_in_process):
    for folder in ("checkpoints", "safeclip_state"):
        (tmp_path / "run" / folder).mkdir(parents=True)
        for epoch in (1, 2):
            shutil.copy(full_run / folder / f"epoch_{epoch}.pt", tmp_path / "run" / folder / f"epoch_{epoch}.pt")
    os.remove(tmp_path / "run" / "safeclip_state" / "epoch_2.pt")
    # a named checkpoint whose state is gone
    again = train_in_process(*safeclip_flags(poisoned_world["shards"], tmp_path, "other"),
                             "--resume", tmp_path / "run" / "checkpoints" / "epoch_2.pt")
    assert again.returncode == 2 and "safeclip_state/epoch_2.pt is missing" in again.stderr
    assert "Traceback" not in again.stderr
    # --resume latest with no checkpoint that has its state: refused too, not a fresh start over them
    os.remove(tmp_path / "run" / "safeclip_state" / "epoch_1.pt")
    latest = train_in_process(*safeclip_flags(poisoned_world["shards"], tmp_path, "run"), "--resume", "latest")
    assert latest.returncode == 2 and "Traceback" not in latest.stderr
    assert latest.stderr.strip().splitlines()[-1].startswith(
        "open_clip_safe.main: error: --resume latest: none of the 2 checkpoints")


@pytest.mark.slow
def test_extending_a_run_with_more_epochs_is_refused_in_one_line(poisoned_world, full_run, tmp_path, train_in_process):
    """open_clip users resume with a larger --epochs; SafeCLIP's plan for the epochs already trained came
    from the old count, so the resume stops with one line naming the flag and both values."""
    for folder in ("checkpoints", "safeclip_state"):
        (tmp_path / "run" / folder).mkdir(parents=True)
        shutil.copy(full_run / folder / "epoch_3.pt", tmp_path / "run" / folder / "epoch_3.pt")
    flags = safeclip_flags(poisoned_world["shards"], tmp_path, "run")
    flags[flags.index("--epochs") + 1] = str(EPOCHS + 2)
    longer = train_in_process(*flags, "--resume", "latest")
    assert longer.returncode == 2 and "Traceback" not in longer.stderr
    assert longer.stderr.strip().splitlines()[-1] == (
        f"open_clip_safe.main: error: --resume: SafeCLIP cannot continue a schedule planned with other settings: "
        f"--epochs saved {EPOCHS}, now {EPOCHS + 2} (resume with the saved values, or start a new run)")


@pytest.mark.slow
def test_bf16_autocast_on_cpu_through_a_mixed_epoch(poisoned_world, tmp_path, wordnet):
    """Also the small-image options: a ramp into the cross-modal warm-up and a milder crop."""
    flags = safeclip_flags(poisoned_world["shards"], tmp_path, "bf16",
                           ["--safeclip-crossmodal-warmup", "3", "--safeclip-crop-scale", "0.5"])
    flags[flags.index("--precision") + 1] = "amp_bf16"
    flags[flags.index("--epochs") + 1] = "3"
    result = run_module("open_clip_safe.main", *flags, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    log = (tmp_path / "bf16" / "out.log").read_text()
    assert phases_logged(log) == {0: "inmodal", 1: "crossmodal", 2: "mixed"}
    assert "RandomResizedCrop(size=(32, 32), scale=(0.5, 1.0)" in log
    assert re.search(r"Train Epoch: 1 crossmodal \[1/\d+ .* LR: 0.000033 ", log)  # 1e-4 / 3: ramp step 1 of 3
    losses = [float(x) for x in re.findall(r"Loss: ([0-9.]+) ", log)]
    assert losses and all(0 < loss < 20 for loss in losses)
    assert (tmp_path / "bf16" / "similarity" / "epoch_002.parquet").exists()


@pytest.mark.slow
def test_views_finished_on_the_device_through_a_mixed_epoch(poisoned_world, tmp_path, wordnet, train_in_process):
    """--safeclip-augment-on device (here the CPU): workers hand uint8 crops, the training steps and the
    similarity pass finish them with the batch transform; a split follows."""
    flags = safeclip_flags(poisoned_world["shards"], tmp_path, "device", ["--safeclip-augment-on", "device"])
    flags[flags.index("--epochs") + 1] = "3"
    result = train_in_process(*flags)
    assert result.returncode == 0, result.stderr[-4000:]
    log = (tmp_path / "device" / "out.log").read_text()
    assert phases_logged(log) == {0: "inmodal", 1: "crossmodal", 2: "mixed"}
    assert "PILToTensor()" in log and "then on cpu for each batch: Photometric(jitter=(0.5, 0.5, 0.5, 0.1)" in log
    losses = [float(x) for x in re.findall(r"Loss: ([0-9.]+) ", log)]
    assert losses and all(0 < loss < 20 for loss in losses)
    table = pq.read_table(tmp_path / "device" / "similarity" / "epoch_002.parquet").to_pandas()
    assert len(table) == poisoned_world["num_samples"] and table["similarity"].between(-1, 1).all()


@pytest.mark.slow
def test_the_oracle_split_ranks_every_poisoned_sample_last(poisoned_world, world, tmp_path, wordnet, train_in_process):
    """--safeclip-oracle-split: the metadata's poisoned samples rank below all others (score = clean
    probability - 2), so no poison is in the safe set; data without that metadata is refused up front.
    --safeclip-unlearn-fraction takes the lowest ranked on the risky side as its suspects: every poison here."""
    flags = safeclip_flags(poisoned_world["shards"], tmp_path, "oracle",
                           ["--safeclip-oracle-split", "--safeclip-score", "mixture", "--safeclip-unlearn-fraction", "0.1"])
    flags[flags.index("--epochs") + 1] = "3"
    result = train_in_process(*flags)
    assert result.returncode == 0, result.stderr[-4000:]
    log = (tmp_path / "oracle" / "out.log").read_text()
    assert (f"SafeCLIP epoch 2: --safeclip-oracle-split ranks the {poisoned_world['num_poisoned']} samples the "
            "metadata marks poisoned last") in log
    assert (f"SafeCLIP epoch 2: unlearning {round(0.1 * poisoned_world['num_samples'])} suspects on the risky side, "
            f"poisoned: other {poisoned_world['num_poisoned']}") in log
    pushes = re.findall(r"Train Epoch: 2 risky .* Unlearn_loss: \S+ \((\S+)\)", log)
    assert pushes and float(pushes[-1]) > 0, "the suspects' ids found in the risky batches"
    assert not re.search(r"safe .*Unlearn_loss", log)
    table = pq.read_table(tmp_path / "oracle" / "similarity" / "epoch_002.parquet").to_pandas()
    poisoned = table["poisoned"].astype(bool)
    assert poisoned.sum() == poisoned_world["num_poisoned"] and 0 < table["safe"].sum() < (~poisoned).sum()
    assert (table["score"][poisoned] - (table["clean_prob"][poisoned] - 2)).abs().max() < 1e-5
    assert (table["score"][~poisoned] == table["clean_prob"][~poisoned]).all()
    assert not (table["safe"] & poisoned).any()

    clean = safeclip_flags(world["splits"]["train"]["shards"], tmp_path, "no-metadata", ["--safeclip-oracle-split"])
    refused = train_in_process(*clean)
    assert refused.returncode == 2
    first_shard = world["splits"]["train"]["shards"].replace("{000000..000003}", "000000")
    assert refused.stderr.strip().splitlines() == [
        f"open_clip_safe.main: error: --safeclip-oracle-split: {first_shard} has its first sample's "
        f"train_0000000.json without a 'poisoned' field (the metadata open_clip_safe.attacks writes)"]


@pytest.fixture
def fake_wandb(tmp_path, monkeypatch):
    """tests/fakes/wandb as open_clip's main and train modules see it; its calls in the returned list."""
    import json
    import sys

    import open_clip_train.main
    import open_clip_train.train

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "fakes"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    import wandb

    wandb.reset()
    monkeypatch.setattr(open_clip_train.main, "wandb", wandb)
    monkeypatch.setattr(open_clip_train.train, "wandb", wandb)
    monkeypatch.setenv("FAKE_WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    yield lambda: [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    monkeypatch.delitem(sys.modules, "wandb")


@pytest.mark.slow
def test_wandb_keeps_every_training_and_evaluation_row(poisoned_world, world, tmp_path, fake_wandb,
                                                       train_in_process):
    """open_clip's evaluate steps by batches-per-epoch x epoch, SafeCLIP's epochs are longer or shorter:
    every row carries the run's global step as "step" (the charts' x axis) and none is dropped."""
    flags = safeclip_flags(poisoned_world["shards"], tmp_path, "wandb", ["--report-to", "wandb", "--val-data",
                                                                         world["splits"]["test"]["csv"]])
    result = train_in_process(*flags)
    assert result.returncode == 0, result.stderr[-4000:]
    calls = fake_wandb()
    rows = [call for call in calls if call["call"] == "log"]
    assert rows and not [row for row in rows if row["dropped"]], "wandb dropped a row"
    assert {(c["name"], c["step_metric"]) for c in calls if c["call"] == "define_metric"} == {
        ("step", None), ("train/*", "step"), ("val/*", "step")}
    steps = [row["values"]["step"] for row in rows]
    assert steps == sorted(steps), "the x axis goes forward"
    evaluations = [row for row in rows if "val/clip_val_loss" in row["keys"]]
    assert [row["values"]["epoch"] for row in evaluations] == list(range(1, EPOCHS + 1))
    for evaluation in evaluations:  # at the step of the epoch's last training row
        before = [row for row in rows[:rows.index(evaluation)] if "train/lr" in row["keys"]]
        assert evaluation["values"]["step"] == before[-1]["values"]["step"]


def test_missing_wordnet_is_one_line_exit_2(poisoned_world, tmp_path, monkeypatch, capsys):
    from open_clip_safe import augment, main

    def no_wordnet():
        raise augment.WordNetMissing("no WordNet found: python -m nltk.downloader wordnet, "
                                     "or apt-get install wordnet-base")
    monkeypatch.setattr(augment, "default_wordnet", no_wordnet)
    with pytest.raises(SystemExit) as exit_info:
        main.main(safeclip_flags(poisoned_world["shards"], tmp_path, "nownet"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "open_clip_safe.main: error: no WordNet found: python -m nltk.downloader wordnet, or apt-get install wordnet-base")
