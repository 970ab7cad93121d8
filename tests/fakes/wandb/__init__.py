"""A stand-in for wandb that fails as the real one does when a process logs before wandb.init, and
records each process's calls to $FAKE_WANDB_DIR/rank{RANK}.jsonl (tests put this folder on PYTHONPATH)."""
import json
import os

_started = False


def _record(call, **fields):
    folder = os.environ.get("FAKE_WANDB_DIR")
    if folder:
        with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as out:
            out.write(json.dumps({"call": call, **fields}) + "\n")


def init(*args, **kwargs):
    global _started
    _started = True
    _record("init", name=kwargs.get("name"))


def log(values, step=None, **kwargs):
    _record("log", keys=sorted(values), step=step)
    if not _started:
        raise RuntimeError("You must call wandb.init() before wandb.log()")


def save(*args, **kwargs):
    _record("save")


def watch(*args, **kwargs):
    _record("watch")


def finish(*args, **kwargs):
    _record("finish")
