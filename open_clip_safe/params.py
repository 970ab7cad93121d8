"""Argument parsing: open_clip's own flags, checked up front so bad input fails in one line.

open_clip reports a missing shard, an empty CSV or an unsized webdataset as a traceback from deep
inside a data-loader worker, often after the model is built. We parse with open_clip's parser
unchanged and then check the data flags before anything is created.
"""
import argparse
import json
import os
import sys
import tarfile

import braceexpand
import pandas as pd
from open_clip_train.params import parse_args as parse_open_clip_args

PROG = "open_clip_safe.main"


class UsageError(ValueError):
    """Bad command-line input; reported as one line with exit status 2."""


def fail(message):
    one_line = "; ".join(part.strip(" -") for part in str(message).splitlines() if part.strip())
    print(f"{PROG}: error: {one_line}", file=sys.stderr)
    sys.exit(2)


def is_remote(url):
    return "://" in url or url.startswith("pipe:")


def dataset_kind(path, dataset_type):
    """The loader open_clip would pick for `path` ('webdataset' or 'csv'), or a UsageError."""
    if dataset_type in ("webdataset", "csv"):
        return dataset_type
    if dataset_type != "auto":
        raise UsageError(f"--dataset-type {dataset_type} is not supported")
    extension = path.split("::")[0].split(".")[-1].rstrip("}")
    if extension in ("csv", "tsv"):
        return "csv"
    if extension == "tar":
        return "webdataset"
    raise UsageError(f"cannot tell the dataset type of {path!r} from its extension; pass --dataset-type")


def expand_shards(spec):
    """Every shard named by an open_clip shard spec (brace patterns, '::'-joined sources)."""
    return [url for source in spec.split("::") for url in braceexpand.braceexpand(source)]


def check_shard(path, flag):
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: shard {path} does not exist")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{flag}: shard {path} is empty")
    try:
        with tarfile.open(path) as tar:
            if tar.next() is None:
                raise UsageError(f"{flag}: shard {path} holds no files")
    except (tarfile.TarError, OSError) as error:
        raise UsageError(f"{flag}: shard {path} is not a readable tar file ({error})") from None


def dataset_size_known(shards):
    """open_clip counts samples from sizes.json or __len__ beside the first shard."""
    folder = os.path.dirname(shards[0])
    sizes_file = os.path.join(folder, "sizes.json")
    if os.path.exists(sizes_file):
        try:
            sizes = json.load(open(sizes_file))
        except (OSError, ValueError) as error:
            raise UsageError(f"{sizes_file} is not readable JSON ({error})") from None
        missing = [s for s in shards if os.path.basename(s) not in sizes]
        if missing:
            raise UsageError(f"{sizes_file} has no entry for shard {missing[0]}")
        return True
    return os.path.exists(os.path.join(folder, "__len__"))


def check_webdataset(args, spec, flag, is_train):
    shards = expand_shards(spec)
    local = [s for s in shards if not is_remote(s)]
    for shard in local:
        check_shard(shard, flag)
    if not is_train:
        return
    if args.train_num_samples is None and not dataset_size_known(shards):
        raise UsageError(
            f"{flag}: no sizes.json or __len__ beside {shards[0]}; pass --train-num-samples")
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    workers = max(1, args.workers) * world_size
    if not args.dataset_resampled and len(shards) < workers:
        raise UsageError(
            f"{flag}: {len(shards)} shard(s) for {workers} data-loader workers in all "
            f"(--workers {args.workers} x {world_size} processes); use fewer --workers or more shards")


def check_csv(args, path, flag, is_train):
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: {path} does not exist")
    try:
        table = pd.read_csv(path, sep=args.csv_separator, nrows=2)
    except (OSError, ValueError) as error:
        raise UsageError(f"{flag}: {path} is not a readable table ({error})") from None
    for key, key_flag in ((args.csv_img_key, "--csv-img-key"), (args.csv_caption_key, "--csv-caption-key")):
        if key not in table.columns:
            raise UsageError(f"{flag}: {path} has no column {key!r} ({key_flag}); it has {list(table.columns)}")
    if table.empty:
        raise UsageError(f"{flag}: {path} has no rows")
    first_image = str(table[args.csv_img_key].iloc[0])
    if not os.path.isfile(first_image):
        raise UsageError(f"{flag}: {path} row 0 names image {first_image}, which does not exist")
    if is_train:
        rows = sum(1 for _ in open(path)) - 1
        world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        if rows < args.batch_size * world_size:
            raise UsageError(
                f"{flag}: {path} has {rows} rows, fewer than one global batch "
                f"(--batch-size {args.batch_size} x {world_size} processes)")


def check_data_args(args):
    """Raise UsageError for data flags that open_clip would only trip over later."""
    if not (args.train_data or args.val_data or args.imagenet_val or args.imagenet_v2
            or args.dataset_type == "synthetic"):
        raise UsageError("no data given: pass --train-data to train (or --val-data / --imagenet-val to evaluate)")
    for spec, flag, is_train in ((args.train_data, "--train-data", True), (args.val_data, "--val-data", False)):
        if not spec:
            continue
        kind = dataset_kind(spec, args.dataset_type)
        if kind == "webdataset":
            check_webdataset(args, spec, flag, is_train)
        elif not is_remote(spec):
            check_csv(args, spec, flag, is_train)
    for path, flag in ((args.imagenet_val, "--imagenet-val"), (args.imagenet_v2, "--imagenet-v2")):
        if path and not os.path.isdir(path):
            raise UsageError(f"{flag}: {path} is not a folder")
    if args.train_data and args.name and args.resume != "latest" and not args.log_local:
        log_file = os.path.join(args.logs, args.name, "out.log")
        if args.logs and args.logs.lower() != "none" and os.path.exists(log_file):
            raise UsageError(
                f"experiment {args.name!r} already exists ({log_file}); use another --name or --resume latest")


def one_line_error(parser, message):
    """argparse.ArgumentParser.error without open_clip's 60-line usage block."""
    fail(message)


def parse_args(argv):
    """open_clip's parse_args plus up-front checks; exits 2 with one line on bad input."""
    original_error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = one_line_error
    try:
        args = parse_open_clip_args(argv)
    finally:
        argparse.ArgumentParser.error = original_error
    try:
        check_data_args(args)
    except UsageError as error:
        fail(str(error))
    return args

