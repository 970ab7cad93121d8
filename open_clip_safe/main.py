"""`python -m open_clip_safe.main`: open_clip's training entry point with our seams installed.

open_clip_train.main.main looks its phases up as module globals at call time, so we replace those
globals for the duration of one run and call open_clip's own main(); nothing in site-packages is
edited and none of open_clip's code is copied. The matching upstream diffs live in patches/.
"""
import contextlib
import sys

import torch
import open_clip_train.main as open_clip_main

import open_clip_safe  # noqa: F401  (registers the tiny model configs)
from open_clip_safe import params, safeclip
from open_clip_safe.augment import WordNetMissing

# The module globals of open_clip_train.main that an extension may replace (see DESIGN.md §3).
SEAMS = ("parse_args", "get_data", "create_loss", "train_one_epoch", "evaluate")


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP that accepts open_clip's `device_ids=[cpu]`: CPU modules must be wrapped with none."""

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


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
    with replaced(open_clip_main, parse_args=params.parse_args, **seams), \
            replaced(torch.nn.parallel, DistributedDataParallel=DistributedDataParallel):
        try:
            result = open_clip_main.main(argv)
        except (params.UsageError, WordNetMissing) as error:  # found once the run is set up
            params.fail(str(error))
    return 1 if result == -1 else 0


if __name__ == "__main__":
    sys.exit(main())
