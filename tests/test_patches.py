"""The upstream patch queue applies to the installed open_clip, and the seams we use still exist."""
import inspect
import os
import subprocess

import open_clip_train
import open_clip_train.main as open_clip_main
import pytest

from conftest import REPO
from open_clip_safe.main import SEAMS

PATCHES = os.path.join(REPO, "patches")
SITE = os.path.dirname(os.path.dirname(open_clip_train.__file__))


def series():
    return [line.strip() for line in open(os.path.join(PATCHES, "series")) if line.strip() and line[0] != "#"]


def test_series_lists_every_patch():
    on_disk = sorted(name for name in os.listdir(PATCHES) if name.endswith(".patch"))
    assert sorted(series()) == on_disk and on_disk


@pytest.mark.parametrize("name", series())
def test_patch_applies_cleanly(name, gnu_patch):
    text = open(os.path.join(PATCHES, name)).read()
    assert text.startswith("Subject: [PATCH]") and "\n\n--- a/" in text, "each patch starts with a header saying why"
    result = subprocess.run([gnu_patch, "-p1", "--dry-run", "--force", "-d", SITE, "-i", os.path.join(PATCHES, name)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "FAILED" not in result.stdout and "offset" not in result.stdout, result.stdout


def test_seams_are_still_module_globals_called_by_main():
    """open_clip_safe replaces these globals; if upstream stops looking them up, we silently do nothing."""
    source = inspect.getsource(open_clip_main.main)
    for name in SEAMS:
        assert callable(getattr(open_clip_main, name, None)), f"open_clip_train.main.{name} is gone"
        assert f"{name}(" in source, f"open_clip_train.main.main no longer calls {name}"
    assert "args = parse_args(args)" in source
    assert "torch.nn.parallel.DistributedDataParallel(model, device_ids=[device]" in source, \
        "upstream changed its DDP call: re-check open_clip_safe.main.DistributedDataParallel and patch 0001"
    assert "train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args" in source
