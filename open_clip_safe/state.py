"""SafeCLIP's state beside open_clip's checkpoints: saved after every epoch, loaded on resume.

LOGS/NAME/safeclip_state/epoch_N.pt sits beside checkpoints/, not in it: open_clip's
`--resume latest` takes the newest `*.pt` below checkpoints/. Both are written atomically
(files.atomic_write), and `--resume latest` takes the newest checkpoint that loads and has its
state, so a save cut short by a kill or a full disk costs an epoch, not the run (docs/design.md#resume).
"""
import glob
import logging
import os
import re
import zipfile

from open_clip_train.file_utils import pt_load
from open_clip_train.main import get_latest_checkpoint as open_clip_latest_checkpoint, natural_key

from open_clip_safe.cli import UsageError
from open_clip_safe.files import atomic_torch_save, is_remote

STATE_DIR = "safeclip_state"
EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt$")


def state_path(checkpoint_dir, epoch):
    """The state saved with checkpoint_dir/epoch_`epoch`.pt (local folder or fsspec URL)."""
    return f"{os.path.dirname(checkpoint_dir.rstrip('/'))}/{STATE_DIR}/epoch_{epoch}.pt"


def save(args, run, loss, epoch):
    """The state after `epoch` epochs (rank 0; open_clip sets save_logs on the master only)."""
    if not args.save_logs:
        return
    path = state_path(args.checkpoint_path, epoch)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_torch_save({"schedule": run.schedule.state_dict(), "global_step": run.global_step,
                       "loss": loss.state_dict()}, path)
    previous = state_path(args.checkpoint_path, epoch - 1)
    if args.delete_previous_checkpoint and os.path.exists(previous):
        os.remove(previous)


def load(args, run, epoch):
    """Restore the state saved with the checkpoint open_clip resumed from (`args.resume`, which is the
    remote copy under --remote-sync); resuming SafeCLIP without it is refused."""
    path = state_path(os.path.dirname(args.resume), epoch)
    try:
        state = pt_load(path, map_location="cpu")
    except FileNotFoundError:
        raise UsageError(f"--resume: {path} is missing; SafeCLIP cannot continue its schedule exactly "
                         f"without the state saved beside the epoch-{epoch} checkpoint") from None
    try:
        run.schedule.load_state_dict(state["schedule"])
    except ValueError as error:
        raise UsageError(f"--resume: {error}") from None
    run.global_step = state["global_step"]
    run.pending_loss_state = state["loss"]
    logging.info(f"SafeCLIP: resumed schedule state from {path}")


def unreadable(path):
    """Why a local checkpoint or state file cannot be loaded, or None. A file cut short has no zip
    directory (torch: "PytorchStreamReader failed reading zip archive")."""
    return None if zipfile.is_zipfile(path) else "cut short or not a torch file (no zip directory)"


def latest_checkpoint(path, remote):
    """open_clip's get_latest_checkpoint, skipping checkpoints that do not load or, in a SafeCLIP run
    (a safeclip_state folder beside them), lack their state; each skipped one is logged."""
    if remote or is_remote(path):
        return open_clip_latest_checkpoint(path, remote)
    candidates = sorted(glob.glob(path + "**/*.pt", recursive=True), key=natural_key, reverse=True)
    with_state = os.path.isdir(os.path.join(os.path.dirname(path.rstrip("/")), STATE_DIR))
    for candidate in candidates:
        problem = unreadable(candidate)
        epoch = EPOCH_FILE.search(candidate)
        if problem is None and with_state and epoch:
            state = state_path(os.path.dirname(candidate), int(epoch.group(1)))
            problem = ("its SafeCLIP state is missing" if not os.path.exists(state)
                       else unreadable(state) and f"its SafeCLIP state {state} does not load")
        if problem is None:
            return candidate
        logging.warning(f"--resume latest: skipping {candidate}: {problem}")
    if candidates:  # starting afresh would overwrite them
        raise UsageError(f"--resume latest: none of the {len(candidates)} checkpoints in {path} can be resumed "
                         f"(see the warnings above)")
    return None
