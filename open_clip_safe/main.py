"""`python -m open_clip_safe.main`: open_clip's training entry point with our seams installed.

open_clip_train.main.main looks its phases up as module globals at call time, so we replace those
globals for the duration of one run and call open_clip's own main(); nothing in site-packages is
edited and none of open_clip's code is copied (docs/design.md#seams). The matching upstream diffs
live in patches/.
"""
import contextlib
import errno
import logging
import os
import sys
import types

import torch
import open_clip_train.main as open_clip_main
import open_clip_train.train as open_clip_train_train
from open_clip_train.logger import setup_logging as open_clip_setup_logging

import open_clip_safe
from open_clip_safe import params, safeclip, state, train as safeclip_train
from open_clip_safe.augment import WordNetMissing
from open_clip_safe.cli import UsageError, fail
from open_clip_safe.files import DiskFull, atomic_torch_save

open_clip_safe.register_model_configs()
# The module globals of open_clip_train.main that an extension may replace (docs/design.md#seams).
SEAMS = ("parse_args", "get_data", "create_loss", "train_one_epoch", "evaluate")
# open_clip's setup_logging sets every logger to INFO, and at exit torch's compiler modules (imported
# by torchvision, unused without --torchcompile) then print statistics after a run's last line,
# error lines included.
QUIET_LOGGERS = ("torch._dynamo", "torch._subclasses", "torch._inductor")


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP that accepts open_clip's `device_ids=[cpu]`: CPU modules must be wrapped with none."""

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


class TorchWithAtomicSave(types.ModuleType):
    """torch as open_clip_train.main sees it, but for `save`: checkpoints are written to a temporary
    file and renamed, so a kill or a full disk leaves no truncated epoch_N.pt behind."""

    save = staticmethod(atomic_torch_save)

    def __getattr__(self, name):
        return getattr(torch, name)


def setup_logging(log_file, level, include_host=False):
    """open_clip's setup_logging, then torch's compiler loggers back to warnings (unless --debug)."""
    open_clip_setup_logging(log_file, level, include_host)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(QUIET_LOGGERS):
            logging.getLogger(name).setLevel(max(level, logging.WARNING))


@contextlib.contextmanager
def replaced(owner, **attributes):
    """Set attributes on a module for the duration of the block, then put the originals back."""
    saved = {name: getattr(owner, name) for name in attributes}
    for name, value in attributes.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


def main(argv=None):
    """Run open_clip's training main with our seams; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    seams = {name: getattr(safeclip, name) for name in SEAMS if hasattr(safeclip, name)}
    wandb = open_clip_train_train.wandb and safeclip_train.WandbOnTheRunStep(open_clip_train_train.wandb)
    with replaced(open_clip_main, parse_args=params.parse_args, get_latest_checkpoint=state.latest_checkpoint,
                  setup_logging=setup_logging, torch=TorchWithAtomicSave("torch"), **seams), \
            replaced(torch.nn.parallel, DistributedDataParallel=DistributedDataParallel), \
            replaced(open_clip_train_train, wandb=wandb):
        try:
            result = open_clip_main.main(argv)
        except (UsageError, WordNetMissing) as error:  # found once the run is set up
            fail(params.TOOL, error)
        except OSError as error:  # a full disk anywhere (checkpoint, state, log, params.txt): one line
            if error.errno != errno.ENOSPC:
                raise
            full = error if isinstance(error, DiskFull) else DiskFull(error.filename or os.getcwd(), error)
            fail(params.TOOL, full.strerror, status=1)
    return 1 if result == -1 else 0


if __name__ == "__main__":
    sys.exit(main())
