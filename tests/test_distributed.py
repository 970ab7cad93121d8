"""Two CPU processes under torchrun with gloo train end to end (upstream's DDP call fails on CPU)."""
import re
import shutil

import open_clip
import pytest
import torch

from conftest import run_cli


@pytest.mark.slow
def test_torchrun_two_cpu_processes(world, tmp_path):
    torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun is installed with torch"
    result = run_cli([
        torchrun, "--standalone", "--nnodes", "1", "--nproc_per_node", "2", "-m", "--", "open_clip_safe.main",
        "--train-data", world["splits"]["train"]["shards"], "--model", "safeclip-micro", "--device", "cpu",
        "--precision", "fp32", "--batch-size", "16", "--epochs", "1", "--workers", "1", "--lr", "1e-3",
        "--log-every-n-steps", "1", "--logs", str(tmp_path), "--name", "ddp",
    ], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    for rank in (0, 1):
        assert f"(global: {rank}, local {rank}), total 2" in output
    log = (tmp_path / "ddp" / "out.log").read_text()
    # every step covers both ranks' batches: 256 samples / (16 x 2) = 8 steps of 32 samples
    seen = [int(n) for n in re.findall(r"Train Epoch: 0 \[\s*(\d+)/256", log)]
    assert seen == list(range(32, 257, 32))
    assert re.search(r"world_size: 2", (tmp_path / "ddp" / "params.txt").read_text())

    checkpoint = torch.load(tmp_path / "ddp" / "checkpoints" / "epoch_1.pt", map_location="cpu")
    assert all(key.startswith("module.") for key in checkpoint["state_dict"])
    model = open_clip.create_model("safeclip-micro")
    model.load_state_dict({k[len("module."):]: v for k, v in checkpoint["state_dict"].items()})


@pytest.mark.slow
def test_torchrun_logs_flag_needs_separator():
    """The documented `-m --` form exists because torchrun prefix-matches --logs (docs/design.md#torchrun-option-matching)."""
    result = run_cli([shutil.which("torchrun"), "--nproc_per_node", "1", "-m", "open_clip_safe.main", "--logs", "x"],
                     timeout=120)
    if result.returncode == 0:
        pytest.fail("torchrun accepted --logs without `--`: the README's workaround may be dropped")
    assert "ambiguous option: --logs" in result.stderr
