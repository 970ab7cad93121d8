"""What the package shares about files: shard lists, image extensions, PNG bytes, atomic saves.

Saves go to a temporary file in the target's folder and are renamed over the target only once
complete, so a kill or a full disk never leaves a truncated checkpoint or state file behind (a
truncated `epoch_N.pt` would otherwise be what `--resume latest` picks up next).
"""
import errno
import io
import os
import shutil

IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")  # the image members open_clip's loaders accept


def shard_list(spec):
    """Every shard named by an open_clip shard spec (brace patterns, '::'-joined sources)."""
    from open_clip_train.data import expand_urls  # here: it imports torchvision (seconds) for the data tools

    return expand_urls(str(spec))[0]


def is_remote(url):
    return "://" in url or url.startswith("pipe:")


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class DiskFull(OSError):
    """A save that did not fit: names the file and the free space left in its folder."""

    def __init__(self, path, cause):
        folder = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free / 2**20 if os.path.isdir(folder) else 0.0
        super().__init__(errno.ENOSPC, f"no space left on device: could not write {path} ({free:.1f} MiB free in "
                                       f"{folder}; {type(cause).__name__}: {str(cause).strip().splitlines()[0]})")


def as_disk_full(path, error):
    """`error` as a DiskFull when writing `path` failed for want of space (ENOSPC, or under 1 MiB left:
    torch.save reports a full disk as "basic_ios::clear: iostream error"), else `error` itself."""
    folder = os.path.dirname(os.path.abspath(path))
    full = getattr(error, "errno", None) == errno.ENOSPC or (os.path.isdir(folder)
                                                             and shutil.disk_usage(folder).free < 2**20)
    return DiskFull(path, error) if full and not isinstance(error, DiskFull) else error


def atomic_write(path, write):
    """`write(file_object)` into a temporary file beside `path`, fsync, then rename it over `path`.

    torch.save reports a full disk as a RuntimeError ("basic_ios::clear: iostream error",
    "PytorchStreamWriter failed writing file"), so any failure on a nearly full disk is a DiskFull.
    """
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        reported = as_disk_full(path, error) if isinstance(error, Exception) else error
        if os.path.exists(temporary):
            os.remove(temporary)
        if reported is not error:
            raise reported from error
        raise


def atomic_torch_save(obj, path, *args, **kwargs):
    """torch.save(obj, path) through `atomic_write` (a path; file objects go to torch.save as they are)."""
    import torch

    if not isinstance(path, (str, os.PathLike)):
        return torch.save(obj, path, *args, **kwargs)
    return atomic_write(os.fspath(path), lambda out: torch.save(obj, out, *args, **kwargs))
