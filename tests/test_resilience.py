"""What a cluster does to a run: a full disk under the log folder, and --remote-sync's copy of the run."""
import os
import subprocess
import time

import pytest

from conftest import run_module


def flags(train_data, logs, name, epochs=2, extra=()):
    return ["--train-data", train_data, "--model", "safeclip-micro", "--device", "cpu", "--precision", "fp32",
            "--batch-size", "16", "--epochs", str(epochs), "--workers", "1", "--lr", "1e-3", "--seed", "0",
            "--logs", str(logs), "--name", name, "--save-frequency", "1", "--safeclip",
            "--safeclip-inmodal-epochs", "1", "--safeclip-crossmodal-epochs", "0", "--safeclip-text-aug", "none",
            "--safeclip-split", "topk", "--safeclip-safe-fraction-start", "0.5", *extra]


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs: room for the logs, not for a checkpoint (about 40 MB with the optimizer)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (mount -t tmpfs)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (mount -t tmpfs): {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_no_truncated_checkpoint(poisoned_world, small_disk):
    start = time.time()
    result = run_module("open_clip_safe.main", *flags(poisoned_world["shards"], small_disk, "full"), timeout=120)
    assert result.returncode != 0 and time.time() - start < 60
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("open_clip_safe.main: error: no space left on device"), result.stderr[-3000:]
    assert f"{small_disk}/full/checkpoints" in last and "MiB free" in last
    assert "Traceback" not in result.stderr
    assert os.listdir(small_disk / "full" / "checkpoints") == [], "no checkpoint, whole or cut, and no temporary file"
    assert not [name for name in os.listdir(small_disk / "full" / "safeclip_state") if ".tmp" in name]


@pytest.mark.slow
def test_remote_sync_carries_the_safeclip_state_and_a_resume_reads_it_there(poisoned_world, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    sync = ["--remote-sync", str(remote), "--remote-sync-protocol", "fsspec"]
    first = run_module("open_clip_safe.main", *flags(poisoned_world["shards"], tmp_path / "local", "run", extra=sync))
    assert first.returncode == 0, first.stderr[-3000:]
    for epoch in (1, 2):
        assert (remote / "run" / "checkpoints" / f"epoch_{epoch}.pt").is_file()
        assert (remote / "run" / "safeclip_state" / f"epoch_{epoch}.pt").is_file()
    # a new node: nothing local; the checkpoint and the SafeCLIP state come from the remote copy
    again = run_module("open_clip_safe.main", *flags(poisoned_world["shards"], tmp_path / "elsewhere", "again",
                                                     epochs=2),
                       "--resume", str(remote / "run" / "checkpoints" / "epoch_1.pt"))
    assert again.returncode == 0, again.stderr[-3000:]
    log = (tmp_path / "elsewhere" / "again" / "out.log").read_text()
    assert f"resumed schedule state from {remote}/run/safeclip_state/epoch_1.pt" in log
