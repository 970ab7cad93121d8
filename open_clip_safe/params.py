"""Argument parsing: the SafeCLIP flag group plus open_clip's own flags, checked up front.

open_clip reports a missing shard, an empty CSV or an unsized webdataset as a traceback from deep
inside a data-loader worker, often after the model is built. We parse the SafeCLIP group with our
own parser, hand every other flag to open_clip's parser unchanged, and check both before anything
is created.
"""
import argparse
import contextlib
import io
import json
import os
import sys
import tarfile

import pandas as pd
from open_clip_train.params import parse_args as parse_open_clip_args

from open_clip_safe.augment import AUTHORS_CROP_SCALE
from open_clip_safe.photometric import AUTHORS_BLUR_SIGMA, AUTHORS_JITTER
from open_clip_safe.cli import DefaultsFormatter, UsageError, fail
from open_clip_safe.files import is_remote, shard_list

TOOL = "main"


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
    shards = shard_list(spec)
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


def check_dist_backend(args):
    """A --dist-backend must carry the training device's tensors (DDP, the losses' gathers); SafeCLIP's
    host-array collectives take a gloo group of their own when it carries no CPU tensors."""
    backend = args.dist_backend
    if backend is None:
        return
    import torch.distributed as dist

    device_type = args.device.split(":")[0]
    per_device = dict(part.split(":", 1) if ":" in part else (device_type, part) for part in backend.split(","))
    for name in set(per_device.values()):
        if not dist.is_available() or not dist.is_backend_available(name):
            raise UsageError(f"--dist-backend {backend}: this torch has no {name!r} backend")
    chosen = per_device.get(device_type)
    if chosen is None or (chosen == "nccl" and device_type != "cuda"):
        raise UsageError(f"--dist-backend {backend} cannot carry the {device_type} tensors of --device {args.device} "
                         f"(NCCL takes CUDA tensors only); use gloo, or omit --dist-backend")


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
    fail(TOOL, message)


def or_auto(kind):
    """An argparse type: a `kind` number, or auto (None), which the run resolves."""
    def parse(value):
        if value == "auto":
            return None
        try:
            return kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} or auto, "
                                             f"got {value!r}") from None
    return parse


def inmodal_lr(value):
    """--safeclip-inmodal-lr: a number, lr (--lr's value) or auto (None)."""
    return "lr" if value == "lr" else or_auto(float)(value)


# The flags a preset sets when they are not given (docs/design.md#presets). measured: what defended best
# in this project's runs: the second signal with the plain similarity views it needs, a safe fraction that
# reaches its cap halfway through the mixed epochs, a 1 + 1 epoch warm-up whose cross-modal rate is sized
# from the run's steps (schedule.auto_filter_lr: one epoch at twice the rate of two moves the weights as
# far and leaves the CLIP loss one more mixed epoch), an in-modal rate of --lr / 5, and open_clip's own
# image views with raw captions.
# authors: the SafeCLIP authors' values. None is "auto" on the command line.
PRESETS = {
    "measured": {"safeclip_score": "neighbours", "safeclip_sim_views": "plain", "safeclip_safe_fraction_step": None,
                 "safeclip_inmodal_epochs": 1, "safeclip_crossmodal_epochs": 1, "safeclip_filter_lr": None,
                 "safeclip_crossmodal_warmup": None, "safeclip_inmodal_lr": None, "safeclip_image_aug": "open_clip",
                 "safeclip_text_aug": "none", "safeclip_rank_similarity": "relative"},
    "authors": {"safeclip_score": "mixture", "safeclip_sim_views": "augmented", "safeclip_safe_fraction_step": 0.01,
                "safeclip_inmodal_epochs": 5, "safeclip_crossmodal_epochs": 1, "safeclip_filter_lr": 5e-6,
                "safeclip_crossmodal_warmup": 0, "safeclip_inmodal_lr": "lr", "safeclip_image_aug": "safeclip",
                "safeclip_text_aug": "eda", "safeclip_rank_similarity": "raw"},
}
# Flags that only the authors' image views read: given, they take those views from the preset.
AUTHORS_VIEW_SETTINGS = ("safeclip_crop_scale", "safeclip_color_jitter", "safeclip_blur_sigma", "safeclip_augment_on")


def shown(value):
    """A flag's value as the command line spells it."""
    return "auto" if value is None else value


def flag_of(name):
    return "--" + name.replace("_", "-")


def preset_defaults(name):
    """The help's defaults of a flag a preset sets: one per preset."""
    return " (default: " + "; ".join(f"{preset} {shown(values[name])}" for preset, values in PRESETS.items()) + ")"


def apply_preset(args, given, defaults):
    """Fill the flags the preset sets and the user did not give; returns the one line that says which
    given flags differ from the preset, or None. The preset follows what the given flags allow: the
    second signal needs a pass on plain views every mixed epoch, so augmented views or fast mode given
    explicitly take the mixture, and the mixture the raw similarity; a setting of the authors' image views
    takes those views."""
    preset = dict(PRESETS[args.safeclip_preset])
    if "safeclip_score" not in given and (given.get("safeclip_sim_views") == "augmented" or args.safeclip_fast):
        preset["safeclip_score"] = "mixture"
    score = given.get("safeclip_score", preset["safeclip_score"])
    if "safeclip_rank_similarity" not in given and score != "neighbours":
        preset["safeclip_rank_similarity"] = "raw"
    if "safeclip_sim_views" not in given and given.get("safeclip_score") == "neighbours":
        preset["safeclip_sim_views"] = "plain"
    if "safeclip_image_aug" not in given and any(getattr(args, name) != getattr(defaults, name)
                                                 for name in AUTHORS_VIEW_SETTINGS):
        preset["safeclip_image_aug"] = "safeclip"
    for name, value in preset.items():
        setattr(args, name, given.get(name, value))
    changed = [f"{flag_of(name)} {shown(given[name])} (preset: {shown(value)})"
               for name, value in PRESETS[args.safeclip_preset].items() if name in given and given[name] != value]
    adapted = [f"{flag_of(name)} {shown(value)}" for name, value in preset.items()
               if name not in given and value != PRESETS[args.safeclip_preset][name]]
    if not (changed or adapted):
        return None
    line = f"SafeCLIP preset {args.safeclip_preset}:"
    line += f" given flags win: {', '.join(changed)}" if changed else ""
    line += f"{';' if changed else ''} so {', '.join(adapted)}" if adapted else ""
    return line


def safeclip_parser():
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, usage=argparse.SUPPRESS,
                                     formatter_class=DefaultsFormatter)
    group = parser.add_argument_group("SafeCLIP (Yang et al., ICML 2024); all need --safeclip")
    group.add_argument("--safeclip", action="store_true",
                       help="Train with SafeCLIP: in-modal and cross-modal warm-up, then per-epoch safe/risky split.")
    group.add_argument("--safeclip-preset", choices=tuple(PRESETS), default="measured",
                       help=f"Defaults of {', '.join(map(flag_of, PRESETS['measured']))} (a flag given wins): "
                            "measured, the configuration that defended best in this project's measurements "
                            "(docs/defense.md); authors, the SafeCLIP authors' values.")
    group.add_argument("--safeclip-inmodal-epochs", type=int, default=argparse.SUPPRESS,
                       help="In-modal (image-image, text-text) warm-up epochs"
                            + preset_defaults("safeclip_inmodal_epochs"))
    group.add_argument("--safeclip-crossmodal-epochs", type=int, default=argparse.SUPPRESS,
                       help="Cross-modal warm-up epochs at --safeclip-filter-lr"
                            + preset_defaults("safeclip_crossmodal_epochs"))
    group.add_argument("--safeclip-filter-lr", type=or_auto(float), default=argparse.SUPPRESS,
                       help="Learning rate of the cross-modal warm-up; the warm-up cosine ends here. auto: the "
                            "authors' 5e-06, raised (at most to --lr) so that a run with fewer steps per epoch than "
                            "theirs moves the weights as far in its cross-modal warm-up"
                            + preset_defaults("safeclip_filter_lr"))
    group.add_argument("--safeclip-crossmodal-warmup", type=or_auto(int), default=argparse.SUPPRESS,
                       help="Ramp the cross-modal warm-up's learning rate linearly from 0 to --safeclip-filter-lr "
                            "over this many steps (a high filter lr needs a ramp); auto: half the cross-modal "
                            "warm-up's steps when the filter lr is above the authors' 5e-06, else 0"
                            + preset_defaults("safeclip_crossmodal_warmup"))
    group.add_argument("--safeclip-inmodal-lr", type=inmodal_lr, default=argparse.SUPPRESS,
                       help="Learning rate of the in-modal loss (warm-up and risky sub-epochs): a number, lr (the "
                            "same as --lr), or auto: --lr / 5, the authors' CC1M ratio (1e-4 against 5e-4)"
                            + preset_defaults("safeclip_inmodal_lr"))
    group.add_argument("--safeclip-memory-bank-size", type=int, default=0,
                       help="Nearest-neighbour memory bank size per modality for the in-modal loss; 0 = off.")
    group.add_argument("--safeclip-split", choices=("gmm", "topk"), default="gmm",
                       help="gmm: 2-component mixture on the similarities; topk: rank by raw similarity.")
    group.add_argument("--safeclip-first-split-threshold", type=float, default=0.9,
                       help="gmm: clean probability a sample needs to be safe at the first mixed epoch.")
    group.add_argument("--safeclip-safe-fraction-start", type=float, default=0.15,
                       help="topk: safe fraction at the first mixed epoch.")
    group.add_argument("--safeclip-safe-fraction-step", type=or_auto(float), default=argparse.SUPPRESS,
                       help="Growth of the safe fraction per update, or auto: the step that reaches "
                            "--safeclip-safe-fraction-max after --safeclip-safe-fraction-auto-share of the mixed "
                            "epochs" + preset_defaults("safeclip_safe_fraction_step"))
    group.add_argument("--safeclip-safe-fraction-auto-share", type=float, default=0.5,
                       help="With --safeclip-safe-fraction-step auto: the share of the mixed epochs after which the "
                            "safe fraction reaches its cap.")
    group.add_argument("--safeclip-safe-fraction-max", type=float, default=0.85, help="Cap of the safe fraction.")
    group.add_argument("--safeclip-update-freq", type=int, default=1,
                       help="Grow the safe fraction every this many mixed epochs.")
    group.add_argument("--safeclip-score", choices=("mixture", "neighbours"), default=argparse.SUPPRESS,
                       help="What ranks the samples at each split: the mixture's clean probability (the authors), or "
                            "neighbours: that, with samples a second signal from the pass's embeddings flags ranked "
                            "last (copies of one image; captions unlike those of the image's nearest neighbours)"
                            + preset_defaults("safeclip_score"))
    group.add_argument("--safeclip-rank-similarity", choices=("raw", "relative"), default=argparse.SUPPRESS,
                       help="What the mixture ranks from the second split on: the pair's cosine (the authors), or "
                            "relative: that less the 75th percentile of the cosines of the pairs whose captions "
                            "are its caption's nearest neighbours (needs --safeclip-score neighbours)"
                            + preset_defaults("safeclip_rank_similarity"))
    group.add_argument("--safeclip-score-quantile", type=float, default=0.05,
                       help="neighbours: the share of samples, those least consistent with their neighbours, flagged.")
    group.add_argument("--safeclip-neighbour-reference", type=int, default=1_000_000,
                       help="neighbours: search among all samples up to this many, else among a fixed random "
                            "subset of this size.")
    group.add_argument("--safeclip-no-cross-aug", dest="safeclip_cross_aug", action="store_false",
                       help="CLIP loss on (image view 1, caption view 1) instead of crosswise views.")
    group.add_argument("--safeclip-text-aug", choices=("eda", "none"), default=argparse.SUPPRESS,
                       help="Caption augmentation: EDA with WordNet, or none (both views are the raw caption)"
                            + preset_defaults("safeclip_text_aug"))
    group.add_argument("--safeclip-image-aug", choices=("safeclip", "open_clip"), default=argparse.SUPPRESS,
                       help="Image views: the authors' augmentation (crop, flip, colour jitter, grayscale, blur), "
                            "or open_clip's train preprocess (--aug-cfg), the views plain open_clip trains on; "
                            "a setting of the authors' views (crop scale, jitter, blur, --safeclip-augment-on) "
                            "makes the preset's views safeclip" + preset_defaults("safeclip_image_aug"))
    group.add_argument("--safeclip-crop-scale", type=float, default=AUTHORS_CROP_SCALE,
                       help=f"Smallest crop area of the image views' RandomResizedCrop (the authors: {AUTHORS_CROP_SCALE}).")
    group.add_argument("--safeclip-augment-on", choices=("auto", "workers", "device"), default="auto",
                       help="Where the photometric part of the safeclip views (jitter, grayscale, blur) runs: in the "
                            "data-loader workers, or on --device for the whole batch after the copy (workers then "
                            "only decode, crop and flip); auto: device on CUDA, else workers.")
    group.add_argument("--safeclip-color-jitter", type=float, nargs=4, default=list(AUTHORS_JITTER),
                       metavar=("BRIGHTNESS", "CONTRAST", "SATURATION", "HUE"),
                       help="ColorJitter strengths of the safeclip views (applied with p 0.8).")
    group.add_argument("--safeclip-blur-sigma", type=float, nargs=2, default=list(AUTHORS_BLUR_SIGMA),
                       metavar=("LOW", "HIGH"), help="Range of the Gaussian blur's sigma of the safeclip views.")
    group.add_argument("--safeclip-sim-views", choices=("augmented", "plain"), default=argparse.SUPPRESS,
                       help="What the similarity pass embeds: view 1, augmented (the authors), or the image as "
                            "open_clip's eval preprocess gives it with the raw caption (a deterministic score)"
                            + preset_defaults("safeclip_sim_views"))
    group.add_argument("--safeclip-oracle-split", action="store_true",
                       help="A bound to measure against, not a defense: the split also ranks last every sample "
                            "whose metadata marks it poisoned (the 'poisoned' field open_clip_safe.attacks writes), "
                            "so the safe sets hold no poison while places remain; what is left is what any split "
                            "would leave (e.g. learned in the warm-up).")
    group.add_argument("--safeclip-unlearn-fraction", type=float, default=0.0,
                       help="Each mixed epoch's risky sub-epoch also pushes the image views of the samples ranked "
                            "lowest at the split, this share of all samples (those in the safe set excepted), off "
                            "their own captions (0: off).")
    group.add_argument("--safeclip-fast", action="store_true",
                       help="Split mixed epochs after the first by the image-caption cosines the training steps "
                            "compute (mean of the two views) instead of a separate similarity pass.")
    group.add_argument("--safeclip-sim-batch-size", type=int, default=None,
                       help="Batch size of the per-sample similarity pass; default: 2 x --batch-size.")
    return parser


def check_fraction(value, flag, low_open=True):
    if not (0 < value <= 1 if low_open else 0 <= value <= 1):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise UsageError(f"{flag} must be in {interval}, got {value}")


def check_view_args(args, defaults):
    """The safeclip views' jitter, blur and where they run: ranges as torchvision's ColorJitter and
    GaussianBlur take them, and a device that exists."""
    brightness, contrast, saturation, hue = args.safeclip_color_jitter
    for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if value < 0:
            raise UsageError(f"--safeclip-color-jitter: {name} must be >= 0, got {value}")
    if not 0 <= hue <= 0.5:
        raise UsageError(f"--safeclip-color-jitter: hue must be in [0, 0.5], got {hue}")
    low, high = args.safeclip_blur_sigma
    if not 0 < low <= high:
        raise UsageError(f"--safeclip-blur-sigma needs 0 < LOW <= HIGH, got {low} {high}")
    if args.safeclip_image_aug == "open_clip":
        changed = [flag for flag, name in (("--safeclip-color-jitter", "safeclip_color_jitter"),
                                           ("--safeclip-blur-sigma", "safeclip_blur_sigma"))
                   if getattr(args, name) != getattr(defaults, name)]
        changed += ["--safeclip-augment-on device"] if args.safeclip_augment_on == "device" else []
        if changed:
            raise UsageError(f"{changed[0]} sets the authors' augmentation; --safeclip-image-aug open_clip has none")
    if args.safeclip_augment_on == "device" and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--safeclip-augment-on device: --device {args.device}, but torch sees no CUDA GPU on "
                             f"this machine; use --safeclip-augment-on workers, or --device cpu")


def augment_on_device(args):
    """Whether the photometric part of the views runs on the training device (--safeclip-augment-on)."""
    if args.safeclip_image_aug != "safeclip":
        return False
    if args.safeclip_augment_on == "auto":
        return str(args.device).startswith("cuda")
    return args.safeclip_augment_on == "device"


def has_logit_bias(model):
    """Whether open_clip's config for `model` gives it a logit_bias parameter. A hub or local-folder
    model (a "schema:" name) is not looked up: that would reach the network before the run starts."""
    import open_clip

    if ":" in model:
        return False
    return "init_logit_bias" in (open_clip.get_model_config(model) or {})


def check_safeclip_args(args, defaults):
    """Reject SafeCLIP settings that cannot run, and SafeCLIP flags given without --safeclip."""
    given = {name: getattr(args, name) for name in PRESETS["measured"] if hasattr(args, name)}
    if not args.safeclip:
        changed = [name for name, value in vars(defaults).items() if getattr(args, name) != value] + list(given)
        if changed:
            raise UsageError(f"{flag_of(changed[0])} needs --safeclip")
        apply_preset(args, given, defaults)  # every run's args name a score and views, as open_clip's params.txt shows
        return
    if given.get("safeclip_score") == "neighbours" and given.get("safeclip_sim_views") == "augmented":
        raise UsageError("--safeclip-score neighbours needs --safeclip-sim-views plain, not augmented: under augmented "
                         "views the copies of one image embed apart, and the second signal cannot find them")
    args.safeclip_preset_note = apply_preset(args, given, defaults)
    warmup_epochs = args.safeclip_inmodal_epochs + args.safeclip_crossmodal_epochs
    if args.safeclip_inmodal_epochs < 0 or args.safeclip_crossmodal_epochs < 0:
        raise UsageError("--safeclip-inmodal-epochs and --safeclip-crossmodal-epochs must be >= 0")
    if args.epochs < warmup_epochs:
        raise UsageError(f"--epochs {args.epochs} is fewer than the {warmup_epochs} SafeCLIP warm-up epochs "
                         f"(--safeclip-inmodal-epochs + --safeclip-crossmodal-epochs)")
    check_fraction(args.safeclip_first_split_threshold, "--safeclip-first-split-threshold")
    check_fraction(args.safeclip_safe_fraction_start, "--safeclip-safe-fraction-start")
    check_fraction(args.safeclip_safe_fraction_max, "--safeclip-safe-fraction-max")
    if args.safeclip_safe_fraction_step is not None:
        check_fraction(args.safeclip_safe_fraction_step, "--safeclip-safe-fraction-step", low_open=False)
    check_fraction(args.safeclip_safe_fraction_auto_share, "--safeclip-safe-fraction-auto-share")
    check_fraction(args.safeclip_unlearn_fraction, "--safeclip-unlearn-fraction", low_open=False)
    if not 0 <= args.safeclip_score_quantile < 1:
        raise UsageError(f"--safeclip-score-quantile must be in [0, 1), got {args.safeclip_score_quantile}")
    if args.safeclip_rank_similarity == "relative" and args.safeclip_score != "neighbours":
        raise UsageError("--safeclip-rank-similarity relative needs --safeclip-score neighbours: the relative "
                         "similarity comes from the second signal's caption neighbours")
    if args.safeclip_fast and args.safeclip_score == "neighbours":
        raise UsageError("--safeclip-fast cannot take --safeclip-score neighbours: the second signal needs the "
                         "embeddings of a similarity pass, which fast mode skips after the first split")
    if args.safeclip_neighbour_reference < 2:
        raise UsageError("--safeclip-neighbour-reference must be at least 2")
    for flag, value in (("--safeclip-filter-lr", args.safeclip_filter_lr),
                        ("--safeclip-inmodal-lr", args.safeclip_inmodal_lr)):
        if value not in (None, "lr") and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    check_fraction(args.safeclip_crop_scale, "--safeclip-crop-scale")
    if args.safeclip_image_aug == "open_clip" and args.safeclip_crop_scale != defaults.safeclip_crop_scale:
        raise UsageError("--safeclip-crop-scale sets the authors' augmentation; with --safeclip-image-aug open_clip "
                         "the crop comes from --aug-cfg scale=(lo,hi)")
    check_view_args(args, defaults)
    if args.safeclip_crossmodal_warmup is not None and args.safeclip_crossmodal_warmup < 0:
        raise UsageError("--safeclip-crossmodal-warmup must be >= 0")
    if args.safeclip_memory_bank_size < 0:
        raise UsageError("--safeclip-memory-bank-size must be >= 0")
    if args.safeclip_update_freq < 1:
        raise UsageError("--safeclip-update-freq must be >= 1")
    if args.safeclip_sim_batch_size is not None and args.safeclip_sim_batch_size < 1:
        raise UsageError("--safeclip-sim-batch-size must be >= 1")
    unsupported = [flag for flag, on in (
        ("--accum-freq > 1", args.accum_freq > 1), ("--siglip", args.siglip), ("--distill-model", args.distill_model is not None),
        ("--dataset-type synthetic", args.dataset_type == "synthetic"), ("--horovod", args.horovod),
        ("a CoCa model", "coca" in args.model.lower()), ("--train-data-upsampling-factors",
                                                        args.train_data_upsampling_factors is not None),
        (f"--model {args.model}: a model with a logit bias (SigLIP's loss), which SafeCLIP's losses never "
         f"train and DDP would wait on", has_logit_bias(args.model)),
    ) if on]
    if unsupported:
        raise UsageError(f"--safeclip does not support {unsupported[0]}")
    if not args.train_data:
        raise UsageError("--safeclip needs --train-data")
    if args.safeclip_oracle_split:
        check_poison_metadata(args)


def check_poison_metadata(args):
    """--safeclip-oracle-split reads which samples are poisoned from the training data's own metadata: the
    first shard's first json, or the CSV's columns, must carry the field open_clip_safe.attacks writes. Checked
    here, on every rank, so that no rank waits on a rank 0 that finds no metadata at the first split."""
    if any(is_remote(source) for source in shard_list(args.train_data)):
        raise UsageError(f"--safeclip-oracle-split reads the poison metadata of local data; {args.train_data} is "
                         f"remote")
    if dataset_kind(args.train_data, args.dataset_type) == "csv":
        if "poisoned" not in pd.read_csv(args.train_data, sep=args.csv_separator, nrows=1).columns:
            raise UsageError(f"--safeclip-oracle-split: {args.train_data} has no 'poisoned' column (the metadata "
                             f"open_clip_safe.attacks writes)")
        return
    first_shard = shard_list(args.train_data)[0]
    with tarfile.open(first_shard) as tar:
        member = next((m for m in tar if m.name.endswith(".json")), None)
        meta = json.load(tar.extractfile(member)) if member is not None else {}
    if "poisoned" not in meta:
        where = f"its first sample's {member.name}" if member is not None else "no json"
        raise UsageError(f"--safeclip-oracle-split: {first_shard} has {where} without a 'poisoned' field (the "
                         f"metadata open_clip_safe.attacks writes)")


def print_help(parser):
    """open_clip's help under our name (one usage block), then the SafeCLIP flags with their defaults."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        parse_open_clip_args(["--help"])
    usage, _, options = text.getvalue().partition("\n\n")
    program = usage.split()[1]
    usage = usage.replace(f"usage: {program}", f"usage: python -m open_clip_safe.{TOOL} [SafeCLIP flags]", 1)
    print(f"{usage}\n\n{options.rstrip()}\n\n{parser.format_help().strip()}")


def parse_args(argv):
    """SafeCLIP flags + open_clip's parse_args, then up-front checks; one-line errors with exit 2."""
    parser = safeclip_parser()
    if "-h" in argv or "--help" in argv:
        print_help(parser)
        sys.exit(0)
    original_error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = one_line_error
    try:
        safeclip_args, rest = parser.parse_known_args(argv)
        args = parse_open_clip_args(rest)
    finally:
        argparse.ArgumentParser.error = original_error
    for name, value in vars(safeclip_args).items():
        setattr(args, name, value)
    try:
        check_safeclip_args(args, parser.parse_args([]))
        check_dist_backend(args)
        check_data_args(args)
    except UsageError as error:
        fail(TOOL, error)
    return args

