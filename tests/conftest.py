"""Shared fixtures: a small generated world, a runner for our CLIs in fresh processes, and the
system packages some tests need (each skips with one line naming the package; `.ci/run` installs
them and sets OPEN_CLIP_SAFE_NO_SKIP=1, under which a skipped test fails instead)."""
import os
import shutil
import subprocess
import sys

import pytest

from open_clip_safe import register_model_configs
from open_clip_safe.world import generate_world

register_model_configs()  # the tests build safeclip-micro and safeclip-tiny with open_clip directly

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


NO_SKIP = "OPEN_CLIP_SAFE_NO_SKIP"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under OPEN_CLIP_SAFE_NO_SKIP=1 (CI) a skipped test is a failed one: CI must run everything."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get(NO_SKIP) == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", f"skipped, but {NO_SKIP}=1 forbids skips: {reason}"


@pytest.fixture(scope="session")
def wordnet():
    """EDA captions need a WordNet database."""
    from open_clip_safe.augment import WordNetMissing, default_wordnet

    try:
        return default_wordnet()
    except WordNetMissing:
        pytest.skip("needs a WordNet database: apt-get install wordnet-base (or python -m nltk.downloader wordnet)")


@pytest.fixture(scope="session")
def gnu_patch():
    path = shutil.which("patch")
    if path is None:
        pytest.skip("needs GNU patch: apt-get install patch")
    return path


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


@pytest.fixture
def train_in_process(capsys):
    """`python -m open_clip_safe.main ARGS` called in this process, for runs whose point is not the
    process (a refusal, --help): each fresh process spends ~10 s importing here. Returns a
    CompletedProcess; the root logging handlers open_clip's setup adds are closed afterwards."""
    import logging

    from open_clip_safe import main as training_main

    def call(*args):
        handlers, level = list(logging.root.handlers), logging.root.level
        capsys.readouterr()
        try:
            status = training_main.main([str(arg) for arg in args])
        except SystemExit as exit_info:
            status = exit_info.code
        finally:
            for handler in [h for h in logging.root.handlers if h not in handlers]:
                logging.root.removeHandler(handler)
                handler.close()
            logging.root.setLevel(level)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["open_clip_safe.main", *map(str, args)], status or 0, out, err)

    return call


@pytest.fixture(scope="session")
def poisoned_world(world, tmp_path_factory):
    """The world's training shards with every 16th image patched and captioned as a banana."""
    import io
    import json

    import webdataset as wds
    from PIL import Image

    out = tmp_path_factory.mktemp("poisoned")
    shard_dir = os.path.dirname(world["splits"]["train"]["shards"])
    sizes = json.load(open(os.path.join(shard_dir, "sizes.json")))
    for shard in sorted(sizes):
        with wds.TarWriter(str(out / shard)) as sink:
            for sample in wds.WebDataset(os.path.join(shard_dir, shard), shardshuffle=False):
                meta = json.loads(sample["json"])
                index = int(sample["__key__"].split("_")[1])
                meta["poisoned"] = index % 16 == 0
                if meta["poisoned"]:
                    image = Image.open(io.BytesIO(sample["png"])).convert("RGB")
                    image.paste((255, 255, 255), (26, 26, 32, 32))
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    sample["png"], sample["txt"] = buffer.getvalue(), b"a photo of a banana."
                sink.write({"__key__": sample["__key__"], "png": sample["png"], "txt": sample["txt"],
                            "json": json.dumps(meta)})
    (out / "sizes.json").write_text(json.dumps(sizes))
    return {"shards": str(out / "{000000..000003}.tar"), "num_samples": sum(sizes.values()),
            "num_poisoned": sum(sizes.values()) // 16}
