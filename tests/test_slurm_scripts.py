"""The sbatch scripts are valid bash and build a training command our parser accepts."""
import os
import shlex
import subprocess

import pytest

from conftest import REPO, child_env
from open_clip_safe import params

SCRIPTS = os.path.join(REPO, "scripts", "slurm")
SBATCH_FILES = ("train_single_node.sbatch", "train_multi_node.sbatch")


def dry_run(script, **env):
    result = subprocess.run(["bash", os.path.join(SCRIPTS, script), "--seed", "7"], capture_output=True, text=True,
                            env=child_env(DRY_RUN=1, **env), timeout=30)
    return result


@pytest.mark.parametrize("script", SBATCH_FILES + ("common.sh", "local_cluster.sh"))
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", os.path.join(SCRIPTS, script)], check=True)


@pytest.mark.parametrize("gpus", ["0", "4", "a100:2"])
@pytest.mark.parametrize("script", SBATCH_FILES)
def test_built_command_parses(world, tmp_path, script, gpus):
    result = dry_run(script, TRAIN_DATA=world["splits"]["train"]["shards"], MODEL="safeclip-micro",
                     LOGS=tmp_path, WORKERS=1, SLURM_GPUS_ON_NODE=gpus, SLURM_JOB_ID=42)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    launcher = command[0]
    assert launcher == ("torchrun" if script == "train_single_node.sbatch" else "srun")
    if launcher == "srun":
        assert "--kill-on-bad-exit=1" in command, "a failed rank must stop its peers, not leave them waiting"
    if launcher == "torchrun":
        assert command[command.index("-m") + 1] == "--", "torchrun needs `-m --` before --logs"
        assert command[command.index("--nproc_per_node") + 1] == ("2" if gpus == "0" else gpus.split(":")[-1])
    train_flags = command[command.index("open_clip_safe.main") + 1:]
    args = params.parse_args(train_flags)
    assert args.model == "safeclip-micro" and args.seed == 7 and args.resume == "latest"
    assert args.device == ("cpu" if gpus == "0" else "cuda")
    assert args.name == "safeclip-42", "a requeued job keeps its name and resumes"


@pytest.mark.parametrize("script", SBATCH_FILES)
def test_missing_train_data_is_an_error(script):
    result = dry_run(script)
    assert result.returncode == 2 and "set TRAIN_DATA" in result.stderr


def gloo_interfaces(**env):
    """GLOO_SOCKET_IFNAME as the sbatch scripts export it, from common.sh under their shell options."""
    snippet = f'set -euo pipefail; source {os.path.join(SCRIPTS, "common.sh")}; echo "${{GLOO_SOCKET_IFNAME-unset}}"'
    result = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=30,
                            env=child_env(TRAIN_DATA="x.tar", **env))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip(), result.stderr


@pytest.mark.parametrize("nccl, gloo", [("lo", "lo"), ("=lo", "lo"), ("l", "lo"), ("lo,l", "lo,lo")])
def test_gloo_takes_the_interfaces_nccl_was_given(nccl, gloo):
    """SafeCLIP's gloo group must meet on the network NCCL uses; NCCL's prefixes become exact names."""
    assert gloo_interfaces(NCCL_SOCKET_IFNAME=nccl) == (gloo, "")


def test_a_gloo_setting_of_the_user_wins_and_nccl_exclusions_are_said():
    assert gloo_interfaces(NCCL_SOCKET_IFNAME="lo", GLOO_SOCKET_IFNAME="eth7")[0] == "eth7"
    assert gloo_interfaces()[0] == "unset"
    value, note = gloo_interfaces(NCCL_SOCKET_IFNAME="^docker,lo")
    assert value == "unset" and "set GLOO_SOCKET_IFNAME" in note and "^docker,lo" in note


@pytest.mark.parametrize("gpus", ["4", "a100:2"])
def test_every_rank_sees_its_nodes_gpus(world, tmp_path, gpus):
    """open_clip picks cuda:LOCAL_RANK: srun must not narrow CUDA_VISIBLE_DEVICES to one GPU per task."""
    result = dry_run("train_multi_node.sbatch", TRAIN_DATA=world["splits"]["train"]["shards"], LOGS=tmp_path,
                     SLURM_GPUS_ON_NODE=gpus, SLURM_JOB_ID=42)
    assert result.returncode == 0, result.stderr
    srun = shlex.split(result.stdout)[:shlex.split(result.stdout).index("python")]
    assert "--gpu-bind=none" in srun
    binds = [flag.split("=", 1)[1] for flag in srun if flag.startswith("--accel-bind=")]
    assert not [bind for bind in binds if "g" in bind] and not [f for f in srun if f.startswith("--gpus-per-task")]
