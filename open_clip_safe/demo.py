"""`python -m open_clip_safe.demo`: the defense end to end on the built-in world.

Generates the world, poisons its training set with a BadNets backdoor and, on top of that, a
targeted poisoning attack (both with `open_clip_safe.attacks`), trains plain CLIP (open_clip's own
loop) and SafeCLIP on the same poisoned data with the same model, epochs and batch size, evaluates
both (`open_clip_safe.evaluate`) and writes one comparison table with the split diagnostics.
"""
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from open_clip_safe.cli import (Parser, UsageError, add_device_flags, check_out_dir, guarded, percent,
                                resolve_precision)


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo's result depends on besides the seed."""

    world_style: str = "glyphs"
    num_train: int = 4000
    num_test: int = 1000
    model: str = "safeclip-tiny"
    epochs: int = 13  # SafeCLIP's CLIP loss sees only its safe samples: it needs more epochs than plain CLIP
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 50
    workers: int = 2
    poison_rate: float = 0.05
    target: str = "banana"
    patch_size: int = 42  # at 224 px: 6 px at 32 px
    patch_kind: str = "noise"
    patch_location: str = "bottom-right"
    num_targets: int = 8
    captions_per_target: int = 10
    inmodal_epochs: int = 1
    crossmodal_epochs: int = 2
    filter_lr: float = 1e-3
    inmodal_lr: float = 2e-4  # the authors' CC1M ratio to the CLIP lr (1e-4 : 5e-4)
    crossmodal_warmup: int = 30
    image_aug: str = "open_clip"  # as plain CLIP; the authors' augmentation alone stops this backdoor
    sim_views: str = "plain"
    text_aug: str = "none"
    cross_aug: bool = False  # raw captions make both caption views equal: crosswise only doubles every forward
    safe_fraction_step: float = 0.25  # cap 85% at the 5th mixed epoch; slower growth costs accuracy (docs/demo.md)
    score: str = "neighbours"  # --safeclip-score: the second signal, as main's measured preset
    adaptive: bool = False  # both attacks with --adaptive-captions
    fast: bool = False  # --safeclip-fast
    small_run: bool = True  # False: SafeCLIP with main's defaults, only --safeclip (the fields above unused)


# The second world, to check that settings tuned on the first transfer: other classes, shapes and
# backgrounds (world.py's tiles style), another trigger (a checkerboard patch, top left) and target.
# tiles-noise: the same world with a trigger its warm-up does not learn (the glyphs' noise patch) at 2%,
# 10 epochs: where the backdoor poisons that do reach the CLIP loss come in while the safe set grows.
WORLDS = {"glyphs": DemoConfig(),
          "tiles": DemoConfig(world_style="tiles", target="rocket", patch_kind="checkerboard",
                              patch_location="top-left"),
          "tiles-noise": DemoConfig(world_style="tiles", target="rocket", poison_rate=0.02, epochs=10)}
# A smoke run of every stage: the test model (safeclip-micro) trains several times faster than the demo's
QUICK = DemoConfig(num_train=512, num_test=128, model="safeclip-micro", epochs=3, batch_size=64, warmup=10,
                   poison_rate=0.04, num_targets=2, captions_per_target=4, inmodal_epochs=1, crossmodal_epochs=1,
                   crossmodal_warmup=4)


def step(number, text):
    print(f"\n[{number}/6] {text}", flush=True)


def clean_out(out, overwrite):
    """Refuse to mix a new demo into an old one's folder unless asked to replace it."""
    check_out_dir(out, overwrite)
    if out.is_dir():
        for name in ("world", "poisoned", "logs", "report"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


class DemoError(UsageError):
    """A stage failed or the input was bad (here or in the benchmark); reported as one line, exit 2."""


def run_attack(argv):
    from open_clip_safe.attacks.__main__ import main as attacks_main

    try:
        status = attacks_main([str(a) for a in argv])
    except SystemExit as stop:
        status = stop.code
    if status:
        raise DemoError(f"the attack tool failed (exit {status}): python -m open_clip_safe.attacks "
                        + " ".join(map(str, argv)))


def poison(world_card, out, config, seed, quiet):
    """BadNets on the clean training set, then targeted poisoning on top: one training set, two cards."""
    from open_clip_safe.attacks import load_attack_card

    backdoor, both = out / "poisoned" / "backdoor", out / "poisoned" / "backdoor+targeted"
    common = ["--seed", seed] + (["--quiet"] if quiet else []) + (["--adaptive-captions"] if config.adaptive else [])
    run_attack(["--train-data", world_card["splits"]["train"]["shards"], "--out", backdoor, "--attack", "badnets",
                "--poison-rate", config.poison_rate, "--target-label", config.target, "--patch-size", config.patch_size,
                "--patch-kind", config.patch_kind, "--patch-location", config.patch_location, *common])
    run_attack(["--train-data", load_attack_card(backdoor)["train_data"], "--out", both,
                "--attack", "targeted", "--target-images", world_card["splits"]["test"]["shards"],
                "--classnames", Path(world_card["dir"]) / "classnames.txt", "--num-targets", config.num_targets,
                "--captions-per-target", config.captions_per_target, *common])
    return backdoor, both


def training_command(config, train_data, logs, name, seed, safeclip, device="cpu", precision="fp32"):
    command = [sys.executable, "-m", "open_clip_safe.main", "--train-data", train_data, "--model", config.model,
               "--device", device, "--precision", precision, "--batch-size", config.batch_size, "--epochs", config.epochs,
               "--workers", config.workers, "--lr", config.lr, "--warmup", config.warmup, "--wd", 0.1,
               "--seed", seed, "--logs", logs, "--name", name, "--save-frequency", config.epochs, "--log-every-n-steps",
               10_000]
    if safeclip and not config.small_run:
        command += ["--safeclip"]
    elif safeclip:
        command += ["--safeclip", "--safeclip-inmodal-epochs", config.inmodal_epochs,
                    "--safeclip-crossmodal-epochs", config.crossmodal_epochs,
                    "--safeclip-filter-lr", config.filter_lr, "--safeclip-inmodal-lr", config.inmodal_lr,
                    "--safeclip-crossmodal-warmup", config.crossmodal_warmup, "--safeclip-image-aug", config.image_aug,
                    "--safeclip-sim-views", config.sim_views, "--safeclip-text-aug", config.text_aug,
                    "--safeclip-safe-fraction-step", config.safe_fraction_step, "--safeclip-score", config.score,
                    "--safeclip-rank-similarity", "relative" if config.score == "neighbours" else "raw"]
        if not config.cross_aug:
            command.append("--safeclip-no-cross-aug")
        if config.fast:
            command.append("--safeclip-fast")
    return [str(part) for part in command]


PROGRESS_MARKS = ("Start epoch", "Train Epoch", "SafeCLIP epoch", "error", "Error")


def train(command, console_log, quiet):
    """Run one training job in its own process; echo its epoch-level progress; return wall seconds."""
    start = time.time()
    with open(console_log, "w") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                         text=True, bufsize=1) as child:
        last = ""
        for line in child.stdout:
            log.write(line)
            text = line.rstrip().split("\r")[-1]
            if text:
                last = text
            if not quiet and any(mark in text for mark in PROGRESS_MARKS) and "Dynamo" not in text:
                print("   " + text.split(" | INFO | ")[-1][:150], flush=True)
    if child.returncode != 0:
        raise DemoError(f"training failed (exit {child.returncode}; full output in {console_log}): {last[:300]}")
    return time.time() - start


def evaluate(config, checkpoint, world_dir, cards, quiet, device="cpu", precision="fp32"):
    """Zero-shot accuracy and attack success of one checkpoint; `cards` are loaded attack cards."""
    import open_clip
    import torch

    from open_clip_safe import register_model_configs
    from open_clip_safe.evaluate import evaluate_model, world_test_set

    register_model_configs()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(config.model, pretrained=str(checkpoint),
                                                                 device=device)
    test_set = world_test_set(world_dir)
    return evaluate_model(model, preprocess, open_clip.get_tokenizer(config.model), test_set, test_set.classnames,
                          test_set.templates, cards, device=device, precision=precision, progress=not quiet)


def markdown_table(rows):
    header = ("method", "zero-shot top-1", "backdoor ASR", "targeted ASR", "poisoned in safe set",
              "split ROC AUC, first → last mixed epoch", "wall time")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        auc = row.get("split_auc") or []
        lines.append("| " + " | ".join((row["method"], percent(row["top1"]), percent(row["backdoor_asr"]),
                                        f"{percent(row['targeted_asr'])} ({row['targeted_hits']}/{row['num_targets']})",
                                        row["poisoned_in_safe_text"],
                                        f"{auc[0]:.3f} → {auc[-1]:.3f}" if auc else "-",
                                        f"{row['wall_seconds'] / 60:.1f} min")) + " |")
    return "\n".join(lines)


def summary_row(method, result, wall, poisoned_total, diagnostics=None):
    targeted = result["targeted"]
    row = {"method": method, "top1": result["top1"], "top5": result["top5"], "backdoor_asr": result["backdoor"]["asr"],
           "targeted_asr": targeted["asr"], "targeted_hits": sum(t["success"] for t in targeted["targets"]),
           "num_targets": targeted["num_targets"], "wall_seconds": wall, "poisoned_total": poisoned_total}
    if diagnostics is None:
        row["poisoned_in_safe_max"] = None
        row["poisoned_in_safe_text"] = f"all {poisoned_total} (no split)"
    else:
        row["poisoned_in_safe_max"] = max(epoch["poisoned_in_safe"] for epoch in diagnostics)
        row["poisoned_in_safe_text"] = (f"{row['poisoned_in_safe_max']} of {poisoned_total} "
                                        f"(most in any of {len(diagnostics)} mixed epochs)")
        row["split_auc"] = [epoch["detector"]["all"]["auc"] for epoch in diagnostics if epoch["detector"]]
    return row


def provenance():
    """The commit the package runs from (with "+changes" when its tree has uncommitted ones) and the date,
    for the report: README's table names them. None outside a git checkout."""
    folder = Path(__file__).parent

    def git(*argv):
        try:
            done = subprocess.run(["git", "-C", folder, *argv], capture_output=True, text=True, timeout=30)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short=7", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", "."):
        commit += "+changes"
    return {"commit": commit, "date": time.strftime("%Y-%m-%d")}


def run_demo(out, config, seed, quiet=False, device="cpu", precision="fp32"):
    from open_clip_safe import diagnostics
    from open_clip_safe.world import generate_world

    started = time.time()
    step(1, f"generating the world: {config.num_train} training and {config.num_test} test images")
    world_card = generate_world(out / "world", config.num_train, config.num_test, seed=seed, style=config.world_style,
                                shard_size=max(1, config.num_train // 8), formats=("wds",), progress=not quiet)
    world_card["dir"] = str(out / "world")

    step(2, f"poisoning: BadNets ({config.patch_location} {config.patch_kind} patch) on {config.poison_rate:.1%} of the "
            f"images -> "
            f"'{config.target}', then {config.num_targets} "
            f"targeted images x {config.captions_per_target} captions")
    backdoor, both = poison(world_card, out, config, seed, quiet)
    from open_clip_safe.attacks import load_attack_card

    cards = [load_attack_card(folder) for folder in (backdoor, both)]
    poisoned_total = sum(card["num_poisoned"] for card in cards)
    train_data = cards[1]["train_data"]

    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    walls, checkpoints = {}, {}
    for number, name, safeclip in ((3, "clip", False), (4, "safeclip", True)):
        step(number, f"training {'SafeCLIP' if safeclip else 'plain CLIP (open_clip loop)'}: {config.model}, "
                     f"{config.epochs} epochs, batch {config.batch_size}")
        command = training_command(config, train_data, logs, name, seed, safeclip, device, precision)
        walls[name] = train(command, logs / f"{name}.console.log", quiet)
        checkpoints[name] = logs / name / "checkpoints" / f"epoch_{config.epochs}.pt"
        print(f"   done in {walls[name] / 60:.1f} min", flush=True)

    step(5, "evaluating both on the clean and triggered test split")
    results = {name: evaluate(config, checkpoints[name], out / "world", cards, quiet, device, precision)
               for name in ("clip", "safeclip")}

    step(6, "split diagnostics and report")
    report = out / "report"
    split_rows, arrays = diagnostics.split_diagnostics(logs / "safeclip")
    plots = diagnostics.plot_diagnostics(split_rows, arrays, report / "plots")
    rows = [summary_row("CLIP", results["clip"], walls["clip"], poisoned_total),
            summary_row("SafeCLIP", results["safeclip"], walls["safeclip"], poisoned_total, split_rows)]
    table = markdown_table(rows)
    summary = {"seed": seed, **provenance(), "config": asdict(config), "rows": rows, "evaluation": results,
               "split_diagnostics": split_rows, "plots": plots, "attack_cards": [str(backdoor), str(both)],
               "total_seconds": time.time() - started}
    (report / "results.json").write_text(json.dumps(summary, indent=2))
    (report / "results.md").write_text(f"{table}\n\nSplit diagnostics (SafeCLIP):\n\n```\n"
                                       f"{diagnostics.diagnostics_table(split_rows)}\n```\n")
    print("\n" + table)
    print("\nSafeCLIP split per mixed epoch:\n" + diagnostics.diagnostics_table(split_rows))
    print(f"\nreport: {report}  (total {summary['total_seconds'] / 60:.1f} min)")
    return summary


def parse_args(argv):
    parser = Parser("demo", __doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="Folder for the world, poisoned data, logs and report.")
    parser.add_argument("--quick", action="store_true", help="A small smoke run (minutes); its figures mean nothing.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the world, the attacks and both training runs.")
    parser.add_argument("--epochs", type=int, help="Training epochs of both runs (default: 13, tiles-noise 10, "
                                                    "--quick 3).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an earlier demo's output in --out.")
    parser.add_argument("--quiet", action="store_true", help="Only stage headers and the final table.")
    parser.add_argument("--world", choices=tuple(WORLDS), default="glyphs",
                        help="glyphs: the demo's world; tiles: another world, trigger and target, with the same "
                             "settings (does what was tuned on glyphs transfer?); tiles-noise: that world with the "
                             "glyphs' noise patch at 2%% and 10 epochs (a trigger the warm-up does not learn).")
    parser.add_argument("--adaptive", action="store_true",
                        help="An adaptive attacker: poisoned captions keep describing their images and add the "
                             "target (the attack tool's --adaptive-captions).")
    parser.add_argument("--score", choices=("mixture", "neighbours"),
                        help=f"SafeCLIP's --safeclip-score (default: {DemoConfig.score}; mixture with --fast).")
    parser.add_argument("--fast", action="store_true",
                        help="SafeCLIP's --safeclip-fast: splits after the first from the training steps' cosines "
                             "(the mixture's score: the second signal needs a pass every mixed epoch).")
    parser.add_argument("--main-defaults", action="store_true",
                        help="Train SafeCLIP with open_clip_safe.main's defaults (--safeclip alone: the authors' "
                             "warm-up, views and EDA captions, the measured preset) instead of the demo's small-run "
                             "settings; plain CLIP is unchanged.")
    add_device_flags(parser)
    args = resolve_precision(parser.parse_args(argv))
    world = WORLDS[args.world]
    config = world
    if args.quick:
        config = replace(QUICK, world_style=world.world_style, target=world.target, patch_kind=world.patch_kind,
                         patch_location=world.patch_location)
    config = replace(config, adaptive=args.adaptive, score=args.score or ("mixture" if args.fast else config.score),
                     fast=args.fast)
    if config.fast and config.score == "neighbours":
        parser.error("--fast cannot take --score neighbours (the second signal needs a similarity pass)")
    if args.main_defaults:
        given = [flag for flag, on in (("--score", args.score), ("--fast", args.fast), ("--quick", args.quick)) if on]
        if given:
            parser.error(f"--main-defaults trains SafeCLIP with main's defaults; it cannot take {given[0]}")
        from open_clip_safe.params import PRESETS

        defaults = PRESETS["measured"]
        config = replace(config, small_run=False, inmodal_epochs=defaults["safeclip_inmodal_epochs"],
                         crossmodal_epochs=defaults["safeclip_crossmodal_epochs"])
    if args.epochs is not None:
        if args.epochs < config.inmodal_epochs + config.crossmodal_epochs + 1:
            parser.error(f"--epochs must leave at least one mixed SafeCLIP epoch after "
                         f"{config.inmodal_epochs + config.crossmodal_epochs} warm-up epochs")
        config = replace(config, epochs=args.epochs)
    return args, config


def run(argv):
    args, config = parse_args(argv)
    out = Path(args.out).resolve()
    clean_out(out, args.overwrite)
    run_demo(out, config, args.seed, args.quiet, args.device, args.precision)


def main(argv=None):
    return guarded("demo", run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
