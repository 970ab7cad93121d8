"""open_clip_safe.main without --safeclip is open_clip: same losses, same weights; bad input fails early."""
import os
import re
import sys

import pytest
import torch

from conftest import REPO, run_cli, run_module
from open_clip_safe import params

PINNED = os.path.join(REPO, "tests", "run_pinned.py")
STEP_LOG = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+.*?(LR: \S+ Logit Scale: \S+ .*)$")


def train_args(data, logs, name, extra=()):
    return ["--train-data", data, "--model", "safeclip-micro", "--device", "cpu", "--precision", "fp32",
            "--batch-size", "32", "--epochs", "2", "--workers", "1", "--lr", "1e-3", "--warmup", "2",
            "--seed", "0", "--log-every-n-steps", "1", "--logs", str(logs), "--name", name, *extra]


def step_losses(log_file):
    """(epoch, samples seen, 'LR ... Logit Scale ... Loss ...') for every logged step; timings dropped."""
    steps = [STEP_LOG.search(line).groups() for line in open(log_file) if STEP_LOG.search(line)]
    assert steps, f"no training steps logged in {log_file}"
    return steps


def final_weights(logs, name):
    checkpoint = torch.load(os.path.join(logs, name, "checkpoints", "epoch_2.pt"), map_location="cpu")
    return checkpoint["state_dict"], checkpoint["optimizer"]["state"]


def assert_same_run(logs, a, b):
    steps_a, steps_b = step_losses(os.path.join(logs, a, "out.log")), step_losses(os.path.join(logs, b, "out.log"))
    assert len(steps_a) == 16  # 256 samples / batch 32 x 2 epochs
    assert steps_a == steps_b
    weights_a, moments_a = final_weights(logs, a)
    weights_b, moments_b = final_weights(logs, b)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    for index in moments_a:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments_a[index][key], moments_b[index][key])


@pytest.mark.slow
def test_parity_with_open_clip_on_webdataset(world, tmp_path):
    data = world["splits"]["train"]["shards"]
    for module, name in (("open_clip_train.main", "upstream"), ("open_clip_safe.main", "ours")):
        result = run_cli([sys.executable, PINNED, module, *train_args(data, tmp_path, name)])
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path, "upstream", "ours")


@pytest.mark.slow
def test_parity_with_open_clip_on_csv(world, tmp_path):
    data = world["splits"]["train"]["csv"]
    for module, name in (("open_clip_train.main", "upstream"), ("open_clip_safe.main", "ours")):
        result = run_cli([sys.executable, PINNED, module, *train_args(data, tmp_path, name, ["--dataset-type", "csv"])])
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path, "upstream", "ours")
    first_weights, _ = final_weights(tmp_path, "ours")
    fresh = __import__("open_clip").create_model("safeclip-micro")
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in first_weights.items()), "nothing trained"


@pytest.mark.slow
def test_help_lists_open_clip_flags(train_in_process):
    result = train_in_process("--help")
    assert result.returncode == 0
    for flag in ("--train-data", "--dataset-type", "--local-loss", "--gather-with-grad", "--precision", "--resume"):
        assert flag in result.stdout


def copy_shard(shard, folder):
    """A readable shard in a folder without sizes.json."""
    return write_bytes(folder / os.path.basename(shard), open(shard, "rb").read())


def write_bytes(path, data):
    path.write_bytes(data)
    return str(path)


BAD_INPUT_CASES = ("unknown-flag", "no-data", "missing-shard", "garbage-shard", "empty-shard", "no-sizes",
                   "too-few-shards", "empty-csv", "csv-columns", "csv-image", "small-csv")


def bad_input(case, world, tmp_path):
    """(flags, expected message) for one kind of bad input; files are made only for the case at hand."""
    shards, csv_file = world["splits"]["train"]["shards"], world["splits"]["train"]["csv"]
    shard_dir = os.path.dirname(shards)
    if case == "unknown-flag":
        return ["--train-data", shards, "--no-such-flag"], "unrecognized arguments: --no-such-flag"
    if case == "no-data":
        return [], "no data given"
    if case == "missing-shard":
        return ["--train-data", os.path.join(shard_dir, "{000000..000009}.tar")], "000004.tar does not exist"
    if case == "garbage-shard":
        bad = write_bytes(tmp_path / "bad.tar", b"not a tar" * 200)
        return ["--train-data", bad, "--train-num-samples", "10"], "bad.tar is not a readable tar file"
    if case == "empty-shard":
        empty = write_bytes(tmp_path / "empty.tar", b"")
        return ["--train-data", empty, "--train-num-samples", "10"], "empty.tar is empty"
    if case == "no-sizes":
        return ["--train-data", copy_shard(os.path.join(shard_dir, "000000.tar"), tmp_path)], "pass --train-num-samples"
    if case == "too-few-shards":
        return ["--train-data", shards, "--workers", "8"], "4 shard(s) for 8 data-loader workers"
    if case == "empty-csv":
        return ["--train-data", write_bytes(tmp_path / "e.csv", b"filepath\ttitle\n")], "has no rows"
    if case == "csv-columns":
        return ["--train-data", csv_file, "--csv-caption-key", "caption"], "no column 'caption'"
    if case == "csv-image":
        table = write_bytes(tmp_path / "m.csv", b"filepath\ttitle\n/no/img.png\ta cat\n")
        return ["--train-data", table], "row 0 names image /no/img.png"
    assert case == "small-csv"
    return ["--train-data", csv_file, "--batch-size", "512"], "fewer than one global batch"


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_line_exit_2(world, tmp_path, case, capsys):
    """In-process for speed; test_bad_input_exit_status_from_the_cli covers the real process."""
    flags, message = bad_input(case, world, tmp_path)
    base = ["--model", "safeclip-micro", "--device", "cpu", "--logs", str(tmp_path), "--workers", "1"]
    with pytest.raises(SystemExit) as exit_info:
        params.parse_args([*base, *flags])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("open_clip_safe.main: error:"), lines
    assert message in lines[0]


@pytest.mark.slow
def test_bad_input_exit_status_from_the_cli(world, tmp_path):
    result = run_module("open_clip_safe.main", "--train-data", os.path.join(tmp_path, "{0..3}.tar"),
                        "--logs", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"open_clip_safe.main: error: --train-data: shard "
                                                  f"{tmp_path}/0.tar does not exist"]
    assert os.listdir(tmp_path) == [], "nothing is written before the input is checked"


@pytest.mark.slow
def test_existing_experiment_is_not_overwritten(world, tmp_path, train_in_process):
    args = train_args(world["splits"]["train"]["shards"], tmp_path, "exp", ["--epochs", "1"])
    assert run_module("open_clip_safe.main", *args).returncode == 0
    log_file = tmp_path / "exp" / "out.log"
    before = log_file.read_text()
    result = train_in_process(*args)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert log_file.read_text() == before
    resumed = run_module("open_clip_safe.main", *args[:-2], "--name", "exp", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming checkpoint" in log_file.read_text()
