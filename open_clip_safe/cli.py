"""What every `python -m open_clip_safe.<tool>` shares: one parser, one exit-2 error path, progress lines.

Bad input (a flag, a file, a sample) ends a tool with one line on stderr and exit status 2, never a
traceback. Progress is a tqdm bar on a terminal and plain lines in a job log, where a bar's
carriage-return frames would pile up (SLURM output files, CI logs).
"""
import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm


class UsageError(ValueError):
    """Bad input: reported as one line on stderr with exit status 2."""


def one_line(message):
    """A message as one line: its lines joined by '; ' (list bullets dropped), white space folded."""
    parts = (" ".join(part.split()) for part in str(message).splitlines())
    return "; ".join(part[2:] if part.startswith("- ") else part for part in parts if part)


def fail(tool, message, status=2):
    print(f"open_clip_safe.{tool}: error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(status)


def guarded(tool, function, *args, errors=(UsageError,)):
    """A tool's exit status from running its body: 0, or 2 with one line on stderr when the body
    raises one of `errors` (bad input)."""
    try:
        function(*args)
    except errors as error:
        print(f"open_clip_safe.{tool}: error: {one_line(error)}", file=sys.stderr, flush=True)
        return 2
    return 0


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default a flag has; switches and flags without a default show none."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: one line (no usage block) with exit status 2 from `guarded`."""

    def __init__(self, tool, description, **kwargs):
        super().__init__(prog=f"python -m open_clip_safe.{tool}", description=description,
                         formatter_class=DefaultsFormatter, **kwargs)
        self.tool = tool

    def error(self, message):
        raise UsageError(message)


def check_out_dir(out, overwrite):
    """A UsageError when `--out` may not be written: a file, or a non-empty folder without --overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} is not empty; pass --overwrite to write into it")


PRECISIONS = ("fp32", "amp", "amp_bf16", "bf16", "fp16")


def add_device_flags(parser):
    """--device (cuda when there is one, else cpu) and --precision (amp on cuda, fp32 elsewhere):
    a GPU user's first command uses the GPU."""
    import torch

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Torch device: cuda when available, else cpu.")
    parser.add_argument("--precision", choices=PRECISIONS, help="open_clip's --precision; default: amp on cuda, "
                                                                "fp32 elsewhere.")


def resolve_precision(args):
    if args.precision is None:
        args.precision = "amp" if args.device.startswith("cuda") else "fp32"
    return args


def percent(value, digits=1):
    return "-" if value is None else f"{100 * value:.{digits}f}%"


class LineProgress:
    """tqdm's interface for a job log: a line at every tenth of the work (or every minute when the
    total is unknown), none in the first `delay` seconds (so a quick failure prints only its error)."""

    def __init__(self, iterable=None, desc="", total=None, unit="it", delay=0.0, log=None, **_):
        self.iterable, self.desc, self.unit, self.delay = iterable, desc, unit, delay
        self.total = total
        if total is None:
            try:
                self.total = len(iterable)
            except TypeError:  # a stream (webdataset's pipelines define __len__ only when sized)
                pass
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.n, self.start, self.next_tenth, self.next_time = 0, time.time(), 1, 60.0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n=1):
        self.n += n
        elapsed = time.time() - self.start
        if self.total:
            tenth = int(10 * self.n / self.total)
            if tenth >= self.next_tenth:
                self.next_tenth = tenth + 1
                if elapsed >= self.delay:
                    self.log(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), "
                             f"{elapsed:.0f} s")
        elif elapsed >= self.next_time:
            self.next_time += 60.0
            self.log(f"{self.desc}: {self.n} {self.unit}, {elapsed:.0f} s")

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable=None, enabled=True, log=None, **kwargs):
    """A tqdm bar when stderr is a terminal, else `LineProgress` (lines to `log`, default stderr)."""
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    return LineProgress(iterable, log=log, **kwargs)


def log_lines(line):
    """A `progress` log for training runs: open_clip's logging (console and out.log)."""
    logging.info(line)
