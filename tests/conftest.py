"""Shared fixtures: a small generated world and a runner for our CLIs in fresh processes."""
import os
import subprocess
import sys

import pytest

from open_clip_safe.world import generate_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """256 training and 64 test samples in 4 + 1 shards, plus the CSV form."""
    out = tmp_path_factory.mktemp("world")
    card = generate_world(out, num_train=256, num_test=64, seed=0, shard_size=64, progress=False)
    card["dir"] = str(out)
    return card


def child_env(**extra):
    """One thread per process: two torch processes with two threads each on 2 cores crawl."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.update({key: str(value) for key, value in extra.items()})
    return env


def run_cli(args, cwd=None, timeout=600, **env):
    """Run a command (list) to completion and return the CompletedProcess with text output."""
    return subprocess.run(args, cwd=cwd or REPO, env=child_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def run_module(module, *args, **kwargs):
    return run_cli([sys.executable, "-m", module, *map(str, args)], **kwargs)
