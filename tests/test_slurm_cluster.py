"""The sbatch scripts run for real on a one-node SLURM cluster started by scripts/slurm/local_cluster.sh."""
import os
import re
import shutil
import subprocess
import tempfile
import time

import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, child_env

SCRIPTS = os.path.join(REPO, "scripts", "slurm")
PACKAGES = "apt-get install -y slurm-wlm munge"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("wordnet")]  # the jobs' SafeCLIP captions use EDA
EPOCHS = 4  # 1 in-modal + 1 cross-modal warm-up epoch, then mixed epochs 2 and 3


@pytest.fixture(scope="module")
def slurm():
    """A local cluster for this module; stopped by its pid files at teardown, also when a test fails."""
    missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"a local SLURM cluster needs root and Debian's slurm-wlm and munge ({PACKAGES})")
    folder = tempfile.mkdtemp(prefix="safeclip-slurm-")  # not under pytest's 0700 folder: munged must reach it
    helper = os.path.join(SCRIPTS, "local_cluster.sh")
    started = subprocess.run(["bash", helper, "start", folder], capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        yield {"SLURM_CONF": os.path.join(folder, "slurm.conf")}
    finally:
        subprocess.run(["bash", helper, "stop", folder], timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def job_env(slurm, world, logs, name, **extra):
    return child_env(SLURM_CONF=slurm["SLURM_CONF"], TRAIN_DATA=world["shards"], MODEL="safeclip-micro",
                     EPOCHS=EPOCHS, BATCH_SIZE=16, WORKERS=1, LOGS=logs, NAME=name,
                     SAFECLIP_ARGS="--safeclip --safeclip-inmodal-epochs 1 --safeclip-crossmodal-epochs 1 "
                                   "--safeclip-safe-fraction-step 0.25 --safeclip-safe-fraction-max 0.6 "
                                   "--lr 1e-3 --seed 0 --log-every-n-steps 4", **extra)


def sbatch(env, cwd, script, *options):
    result = subprocess.run(["sbatch", "--parsable", *options, os.path.join(SCRIPTS, script)], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_state(env, job):
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    found = re.search(r"JobState=(\w+)", shown)
    return found.group(1) if found else "UNKNOWN"


def wait_for(env, job, states, timeout=240, until=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(env, job)
        if state in states or (until is not None and until()):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} still {job_state(env, job)} after {timeout} s")


SINGLE = ("train_single_node.sbatch", "--cpus-per-task", "2")
MULTI = ("train_multi_node.sbatch", "--nodes", "1", "--ntasks-per-node", "2", "--cpus-per-task", "1")


def submit_and_wait(slurm, world, folder, script):
    env = job_env(slurm, world, folder / "logs", "run")
    job = sbatch(env, folder, *script)
    return folder, job, wait_for(env, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})


@pytest.fixture(scope="module")
def single_node_run(slurm, poisoned_world, tmp_path_factory):
    """One uninterrupted single-node job: checked by itself, and the reference a resumed job must match."""
    return submit_and_wait(slurm, poisoned_world, tmp_path_factory.mktemp("single"), SINGLE)


@pytest.mark.parametrize("script", [SINGLE, MULTI], ids=["single-node-torchrun", "multi-node-srun"])
def test_sbatch_script_trains_with_safeclip(slurm, poisoned_world, tmp_path, script, request):
    if script is SINGLE:
        folder, job, state = request.getfixturevalue("single_node_run")
    else:
        folder, job, state = submit_and_wait(slurm, poisoned_world, tmp_path, script)
    output = (folder / f"safeclip-{job}.out").read_text()
    assert state == "COMPLETED", output[-4000:]
    for rank in (0, 1):
        assert f"(global: {rank}, local {rank}), total 2" in output
    assert f"SafeCLIP epoch {EPOCHS - 1}: mixed phase" in output and f"Train Epoch: {EPOCHS - 1} safe" in output
    run = folder / "logs" / "run"
    assert (run / "checkpoints" / f"epoch_{EPOCHS}.pt").exists()
    table = pq.read_table(run / "similarity" / f"epoch_{EPOCHS - 1:03d}.parquet").to_pandas()
    assert len(table) == poisoned_world["num_samples"] and table["key"].is_unique


def test_cancelled_job_resubmitted_resumes_to_the_same_schedule(slurm, poisoned_world, tmp_path, single_node_run):
    """scancel (SIGTERM) after the first epoch's checkpoint, submit again: the scripts pass --resume latest;
    the resumed job ends with the uninterrupted job's schedule and splits."""
    env = job_env(slurm, poisoned_world, tmp_path / "logs", "preempted")
    first = sbatch(env, tmp_path, *SINGLE)
    checkpoint = tmp_path / "logs" / "preempted" / "checkpoints" / "epoch_1.pt"
    wait_for(env, first, {"COMPLETED", "FAILED"}, until=checkpoint.exists)
    subprocess.run(["scancel", first], env=env, check=True)
    assert wait_for(env, first, {"CANCELLED", "COMPLETED", "FAILED"}) == "CANCELLED"
    assert not (tmp_path / "logs" / "preempted" / "checkpoints" / f"epoch_{EPOCHS}.pt").exists()
    second = sbatch(env, tmp_path, *SINGLE)
    assert wait_for(env, second, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED", \
        (tmp_path / f"safeclip-{second}.out").read_text()[-4000:]
    assert "resuming checkpoint" in (tmp_path / f"safeclip-{second}.out").read_text()

    folder, _, state = single_node_run
    assert state == "COMPLETED"
    runs = (tmp_path / "logs" / "preempted", folder / "logs" / "run")
    states = [torch.load(run / "safeclip_state" / f"epoch_{EPOCHS}.pt", weights_only=False) for run in runs]
    assert states[0]["schedule"] == states[1]["schedule"] and states[0]["global_step"] == states[1]["global_step"]
    for epoch in range(2, EPOCHS):
        a, b = (pq.read_table(run / "similarity" / f"epoch_{epoch:03d}.parquet")
                .to_pandas().sort_values("key").reset_index(drop=True) for run in runs)
        assert a.equals(b), f"epoch {epoch}: the split differs after the resume"
