"""A stand-in for wandb that fails as the real one does when a process logs before wandb.init, drops a
row whose explicit step is below the run's current step (real wandb warns "step must be monotonically
increasing" and drops it), and records each process's calls to $FAKE_WANDB_DIR/rank{RANK}.jsonl
(tests put this folder on PYTHONPATH, or import it and reset())."""
import json
import os

_started = False
_step = -1  # the step of the last row written


def reset():
    global _started, _step
    _started, _step = False, -1


def _record(call, **fields):
    folder = os.environ.get("FAKE_WANDB_DIR")
    if folder:
        with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as out:
            out.write(json.dumps({"call": call, **fields}) + "\n")


def init(*args, **kwargs):
    global _started
    _started = True
    _record("init", name=kwargs.get("name"))


def define_metric(name, step_metric=None, **kwargs):
    _record("define_metric", name=name, step_metric=step_metric)


def log(values, step=None, commit=None, **kwargs):
    global _step
    if not _started:
        raise RuntimeError("You must call wandb.init() before wandb.log()")
    dropped = step is not None and step < _step
    if not dropped:
        _step = _step + 1 if step is None else step
    _record("log", keys=sorted(values), step=step, wandb_step=None if dropped else _step, dropped=dropped,
            values={key: value for key, value in values.items() if isinstance(value, (int, float))})


def save(*args, **kwargs):
    _record("save")


def watch(*args, **kwargs):
    _record("watch")


def finish(*args, **kwargs):
    _record("finish")
