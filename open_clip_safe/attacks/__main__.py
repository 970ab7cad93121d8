"""Build a poisoned copy of an open_clip training set (webdataset shards or CSV) and its attack card.

    python -m open_clip_safe.attacks --train-data /x/train/{000000..000007}.tar --out DIR \\
        --attack badnets --poison-rate 0.01 --target-label banana
    python -m open_clip_safe.attacks --train-data /x/train/{000000..000007}.tar --out DIR --attack targeted \\
        --target-images /x/test/000000.tar --classnames /x/classnames.txt
"""
import shlex
import sys
from pathlib import Path

from ..cli import Parser, UsageError, check_out_dir, guarded
from .build import ATTACKS, BACKDOORS, build
from .triggers import PATCH_KINDS, PATCH_LOCATIONS, TRIGGERS

TOOL = "attacks"
DEFAULT_TARGET = "banana"  # CleanCLIP's backdoor target


def build_parser():
    parser = Parser(TOOL, __doc__.split("\n\n")[0],
                    epilog="Writes under --out: the poisoned shards and sizes.json (or the CSV and images/), "
                           "attack.json (the attack card), poisoned_keys.txt and, for targeted, targets/.")
    data = parser.add_argument_group("data")
    data.add_argument("--train-data", required=True,
                      help="Training data: webdataset shards (brace spec, '::'-separated lists) or a .csv/.tsv file.")
    data.add_argument("--out", required=True, help="Output folder (must be empty or absent, unless --overwrite).")
    data.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty --out.")
    data.add_argument("--csv-separator", default="\t", help="CSV field separator, as open_clip (default: %(default)r).")
    data.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths.")
    data.add_argument("--csv-caption-key", default="title", help="CSV column of captions.")
    data.add_argument("--csv-label-key", default="label",
                      help="CSV column of integer labels (--target-images; filled in for injected training rows).")
    attack = parser.add_argument_group("attack")
    attack.add_argument("--attack", required=True, choices=ATTACKS, help="Attack to simulate.")
    attack.add_argument("--poison-rate", type=float,
                        help="Backdoors: fraction of training samples to poison, in (0, 1), rounded half up.")
    attack.add_argument("--num-poisons", type=int, help="Backdoors: exact number of samples to poison.")
    attack.add_argument("--target-label",
                        help=f"Class word the attack aims at. Backdoors: default {DEFAULT_TARGET!r}; it must appear "
                             "in some training caption. Targeted: fixes the adversarial class of every target "
                             "(must be in --classnames); default: a seeded class other than each target's own.")
    attack.add_argument("--adaptive-captions", action="store_true",
                        help="An attacker who knows SafeCLIP ranks by image-caption similarity: each poisoned "
                             "caption keeps describing its image and adds the target ('a photo of a star with a "
                             "banana.'; targeted: the target image's own class, then the adversarial one).")
    attack.add_argument("--seed", type=int, default=0, help="Same arguments and seed, same output bytes.")
    attack.add_argument("--quiet", action="store_true", help="No progress bars.")
    trigger = parser.add_argument_group("backdoor triggers")
    trigger.add_argument("--trigger", choices=tuple(TRIGGERS), default="badnets",
                         help="label-consistent: the trigger it stamps.")
    trigger.add_argument("--patch-kind", choices=PATCH_KINDS, default="noise",
                         help="badnets: seeded noise (the same on every image), white, or a 1-px checkerboard.")
    trigger.add_argument("--patch-size", type=int, default=16,
                         help="badnets: patch side in pixels at 224 px, scaled to the image's shorter side, "
                              "at least 3 px (16 at 32 px gives 3 px).")
    trigger.add_argument("--patch-location", choices=PATCH_LOCATIONS, default="random",
                         help="badnets: where the patch goes; random is per image, from the seed and sample key.")
    trigger.add_argument("--blend-ratio", type=float, default=0.2, help="blended: x' = (1 - r) x + r pattern.")
    trigger.add_argument("--blend-image",
                         help="blended: pattern image (copied beside the card); default: seeded noise.")
    trigger.add_argument("--warp-grid", type=int, default=4, help="wanet: control grid side k.")
    trigger.add_argument("--warp-strength", type=float, default=0.5, help="wanet: warp strength s.")
    trigger.add_argument("--sig-amplitude", type=float, default=60, help="sig: amplitude in 0..255 pixel units.")
    trigger.add_argument("--sig-frequency", type=float, default=6, help="sig: periods across the image width.")
    targeted = parser.add_argument_group("targeted poisoning")
    targeted.add_argument("--target-images",
                          help="Labelled test data to pick targets from: shards with a cls field, or a CSV with "
                               "--csv-img-key and --csv-label-key columns.")
    targeted.add_argument("--classnames", help="Class names, one per line, in label order.")
    targeted.add_argument("--num-targets", type=int, default=8, help="Target images.")
    targeted.add_argument("--captions-per-target", type=int, default=20,
                          help="Injected captions per target (training captions naming the adversarial class, "
                               "filled from templates where too few exist).")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    checks = [
        (not 0 < args.blend_ratio <= 1, "--blend-ratio must be in (0, 1]"),
        (len(args.csv_separator) != 1, "--csv-separator must be one character"),
        (args.patch_size < 1, "--patch-size must be at least 1"),
        (args.warp_grid < 2, "--warp-grid must be at least 2"),
        (args.warp_strength <= 0, "--warp-strength must be positive"),
        (not 0 < args.sig_amplitude <= 255, "--sig-amplitude must be in (0, 255]"),
        (args.sig_frequency <= 0, "--sig-frequency must be positive"),
    ]
    if args.attack in BACKDOORS:
        if (args.poison_rate is None) == (args.num_poisons is None):
            parser.error("give exactly one of --poison-rate and --num-poisons")
        checks += [
            (args.poison_rate is not None and not 0 < args.poison_rate < 1,
             f"--poison-rate must be in (0, 1), got {args.poison_rate}"),
            (args.num_poisons is not None and args.num_poisons < 1, "--num-poisons must be at least 1"),
            (args.target_images is not None or args.classnames is not None,
             "--target-images and --classnames are for --attack targeted"),
        ]
        args.target_label = DEFAULT_TARGET if args.target_label is None else args.target_label
        checks.append((args.adaptive_captions and args.attack == "label-consistent",
                       "--adaptive-captions: a label-consistent attack keeps its captions already"))
    else:
        checks += [
            (args.poison_rate is not None or args.num_poisons is not None,
             "--attack targeted injects --num-targets x --captions-per-target samples: "
             "--poison-rate and --num-poisons do not apply"),
            (args.target_images is None or args.classnames is None,
             "--attack targeted needs --target-images and --classnames"),
            (args.num_targets < 1 or args.captions_per_target < 1,
             "--num-targets and --captions-per-target must be at least 1"),
        ]
    if args.target_label is not None and not args.target_label.strip():
        checks.append((True, "--target-label must not be empty"))
    for failed, message in checks:
        if failed:
            parser.error(message)
    check_out_dir(args.out, args.overwrite)
    return args


def run(argv):
    args = parse_args(argv)
    try:
        card = build(args, shlex.join(["python", "-m", f"open_clip_safe.{TOOL}", *argv]))
    except OSError as error:
        raise UsageError(f"cannot write under --out: {error}") from None
    print(f"{card['num_poisoned']} of {card['num_samples']} samples poisoned ({card['attack']}); "
          f"train data: {card['train_data']}; card: {Path(args.out).resolve() / 'attack.json'}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    return guarded(TOOL, run, argv)


if __name__ == "__main__":
    sys.exit(main())
