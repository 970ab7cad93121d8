"""What the `python -m open_clip_safe.<tool>` commands share: a one-line error and exit status 2."""
import argparse
import sys
from pathlib import Path


def fail(tool, message):
    print(f"open_clip_safe.{tool}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) with exit status 2."""

    def __init__(self, tool, description):
        super().__init__(prog=f"python -m open_clip_safe.{tool}", description=description,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        self.tool = tool

    def error(self, message):
        fail(self.tool, message)


def out_dir_problem(out, overwrite):
    """Why `--out` may not be written, or None: a file, or a non-empty folder without --overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a folder"
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        return f"--out {out} is not empty; pass --overwrite to write into it"
    return None
