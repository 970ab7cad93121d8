"""The layer every tool shares: one-line errors with exit 2, defaults in --help, progress as lines in a log."""
import argparse
import importlib
import io
import re

import pytest

from open_clip_safe import cli, params

TOOLS = ("main", "world", "attacks", "evaluate", "demo", "bench")


def test_one_line_joins_lines_and_bullets():
    assert cli.one_line("bad input:\n- first\n  - second  \n\nlast") == "bad input:; first; second; last"


def test_usage_error_ends_a_tool_with_one_line_and_status_2(capsys):
    def broken():
        raise cli.UsageError("--out x: not a folder\nsee --help")

    assert cli.guarded("world", broken) == 2
    assert capsys.readouterr().err == "open_clip_safe.world: error: --out x: not a folder; see --help\n"
    assert cli.guarded("world", lambda: None) == 0


def help_text(tool, capsys):
    """A tool's --help as its parser prints it (in-process: each process start costs ~10 s of imports)."""
    module = {"main": "open_clip_safe.params", "attacks": "open_clip_safe.attacks.__main__"}.get(
        tool, f"open_clip_safe.{tool}")
    parse = importlib.import_module(module).parse_args
    with pytest.raises(SystemExit) as stop:
        parse(["--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_has_one_usage_block_and_shows_its_defaults(tool, capsys):
    text = help_text(tool, capsys)
    assert text.count("usage:") == 1 and f"python -m open_clip_safe.{tool}" in text
    assert "(default: " in text


def test_main_help_shows_every_safeclip_default(capsys):
    from open_clip_safe.params import safeclip_parser

    text = help_text("main", capsys)
    group = text[text.index("SafeCLIP (Yang et al."):]
    presets = 0
    for action in safeclip_parser()._actions:
        if action.nargs == 0 or action.default is None:
            continue
        flag = action.option_strings[0]
        help_lines = " ".join(re.search(rf"\n  {re.escape(flag)}(?=[ \n]).*?(?=\n  --|\Z)", group, re.S).group(0).split())
        if action.default == argparse.SUPPRESS:  # set by --safeclip-preset: both presets' values
            name = action.dest
            presets += 1
            assert (f"(default: measured {params.shown(params.PRESETS['measured'][name])}; "
                    f"authors {params.shown(params.PRESETS['authors'][name])})") in help_lines, flag
        else:
            assert f"(default: {action.default})" in help_lines, flag
    assert presets == len(params.PRESETS["measured"]) == len(params.PRESETS["authors"]) == 11


def test_progress_in_a_job_log_is_lines_not_frames(monkeypatch):
    lines = []
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    bar = cli.progress(range(50), desc="similarity pass (epoch 3)", unit="batch", total=50, delay=0,
                       log=lines.append)
    assert list(bar) == list(range(50))
    assert len(lines) == 10 and all("\r" not in line for line in lines)
    assert lines[0].startswith("similarity pass (epoch 3): 5/50 batch (10%)")
    assert lines[-1].startswith("similarity pass (epoch 3): 50/50 batch (100%)")


def test_progress_waits_before_its_first_line(monkeypatch):
    """A quick run (or a quick failure) prints no progress, so an error stays the only stderr line."""
    lines = []
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with cli.progress(total=3, desc="scan", delay=1, log=lines.append) as bar:
        for _ in range(3):
            bar.update()
    assert lines == []


def test_the_data_tools_start_without_open_clip():
    """open_clip's import (torch, torchvision, transformers) takes seconds; the world and attack tools
    never build a model, so neither they nor the package import it."""
    import subprocess
    import sys

    from conftest import REPO, child_env

    probe = ("import sys, open_clip_safe, open_clip_safe.world, open_clip_safe.attacks.__main__; "
             "print(sorted(name for name in ('open_clip', 'open_clip_train', 'sklearn') if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
