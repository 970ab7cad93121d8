"""Evaluate a CLIP checkpoint: zero-shot top-1/top-5, backdoor and targeted attack success, split diagnostics.

The zero-shot head is open_clip's own (`build_zero_shot_classifier`, its ImageNet class names and
templates by default). Attack success needs the attack card written by `open_clip_safe.attacks`:
backdoor ASR is the share of triggered test images whose true class is not the target that are
classified as the target; targeted ASR the share of target images classified as their adversarial
class. `--similarity-logs` adds the per-epoch split diagnostics of a SafeCLIP run, with plots.
"""
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from open_clip_safe.attacks import apply_trigger, load_attack_card, target_samples
from open_clip_safe import cli
from open_clip_safe.cli import Parser, UsageError, add_device_flags, guarded, percent, resolve_precision
from open_clip_safe.files import IMAGE_EXTENSIONS, is_remote, shard_list


class EvaluationError(UsageError):
    """Bad input found while evaluating (a file, a label, a class name); reported as one line, exit 2."""


# ---------------------------------------------------------------- test sets


@dataclass
class TestSet:
    """A labelled test set as a map-style dataset of (key, image, label) or a webdataset pipeline."""

    source: object
    name: str
    classnames: list = None
    templates: list = None


class FileSamples(Dataset):
    """(key, path, label) rows loaded lazily; the key is the file's stem (seeds random trigger positions)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        key, path, label = self.rows[index]
        try:
            return key, Image.open(path).convert("RGB"), label
        except OSError as error:
            raise EvaluationError(f"cannot read test image {path}: {error}") from error


def folder_test_set(root):
    """An ImageNet-style folder, read by torchvision's ImageFolder rules (classes in sorted order)."""
    try:
        folder = ImageFolder(root, allow_empty=True)
    except (FileNotFoundError, OSError) as error:
        raise EvaluationError(f"--test-data {root}: {error}") from error
    if not folder.samples:
        raise EvaluationError(f"--test-data {root}: no class sub-folders with images")
    rows = [(os.path.splitext(os.path.relpath(path, root))[0], path, label) for path, label in folder.samples]
    return TestSet(FileSamples(rows), str(root))


def csv_test_set(path, image_key, label_key, separator):
    try:
        table = pd.read_csv(path, sep=separator)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise EvaluationError(f"--test-data {path}: cannot read CSV: {error}") from error
    missing = [column for column in (image_key, label_key) if column not in table.columns]
    if missing:
        raise EvaluationError(f"--test-data {path}: missing column(s) {', '.join(missing)} "
                              f"(has {', '.join(map(str, table.columns))}); see --csv-img-key/--csv-label-key")
    if table.empty:
        raise EvaluationError(f"--test-data {path}: no rows")
    base = os.path.dirname(os.path.abspath(path))
    rows = [(Path(image).stem, image if os.path.isabs(image) else os.path.join(base, image), int(label))
            for image, label in zip(table[image_key].astype(str), table[label_key])]
    return TestSet(FileSamples(rows), str(path))


def wds_test_set(spec):
    import webdataset as wds

    urls = shard_list(spec)
    for url in urls:
        if not is_remote(url) and not os.path.isfile(url):
            raise EvaluationError(f"--test-data: shard {url} does not exist")
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(),
                                wds.decode("pil"), wds.to_tuple("__key__", ";".join(IMAGE_EXTENSIONS), "cls"))
    return TestSet(pipeline, spec)


def world_test_set(world_dir):
    from open_clip_safe.world import load_card

    card = load_card(world_dir)
    split = card["splits"]["test"]
    test_set = csv_test_set(split["csv"], "filepath", "label", "\t") if "csv" in split else wds_test_set(split["shards"])
    test_set.classnames, test_set.templates = card["classes"], card["templates"]
    return test_set


def load_test_set(args):
    if args.world:
        return world_test_set(args.world)
    data = args.test_data
    if os.path.isdir(data):
        return folder_test_set(data)
    if data.endswith((".csv", ".tsv")):
        if not os.path.isfile(data):
            raise EvaluationError(f"--test-data {data}: no such file")
        return csv_test_set(data, args.csv_img_key, args.csv_label_key, args.csv_separator)
    if ".tar" in data:
        return wds_test_set(data)
    raise EvaluationError(f"--test-data {data}: not a class folder, a .csv/.tsv file or webdataset shards (.tar)")


# ---------------------------------------------------------------- class names and templates


def read_lines(path, flag):
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as error:
        raise EvaluationError(f"{flag} {path}: {error}") from error
    if not lines:
        raise EvaluationError(f"{flag} {path}: empty file")
    return lines


def class_names_and_templates(args, test_set):
    """--classnames/--templates files, else the world's own, else open_clip's ImageNet ones."""
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    classnames = (read_lines(args.classnames, "--classnames") if args.classnames
                  else test_set.classnames or list(IMAGENET_CLASSNAMES))
    templates = (read_lines(args.templates, "--templates") if args.templates
                 else test_set.templates or list(OPENAI_IMAGENET_TEMPLATES))
    if isinstance(templates[0], str) and any("{}" not in template for template in templates):
        raise EvaluationError(f"--templates {args.templates}: every template needs a '{{}}' for the class name")
    return classnames, templates


# ---------------------------------------------------------------- evaluation


class Prepared:
    """(key, image, label) -> (clean tensor, triggered tensor or empty, label); picklable for workers."""

    def __init__(self, preprocess, card):
        self.preprocess, self.card = preprocess, card

    def __call__(self, sample):
        key, image, label = sample
        triggered = torch.empty(0)
        if self.card is not None:
            triggered = self.preprocess(apply_trigger(self.card, image, key))
        return self.preprocess(image), triggered, int(label)


class PreparedFiles(Dataset):
    def __init__(self, samples, prepare):
        self.samples, self.prepare = samples, prepare

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.prepare(self.samples[index])


def test_loader(test_set, prepare, batch_size, workers):
    if isinstance(test_set.source, FileSamples):
        dataset = PreparedFiles(test_set.source, prepare)
    else:
        import webdataset as wds
        dataset = test_set.source.compose(wds.map(prepare))
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)


class ZeroShot:
    """open_clip's zero-shot head over `classnames`, and top-k predictions for image batches."""

    def __init__(self, model, tokenizer, classnames, templates, device, precision="fp32", progress=False):
        from open_clip import build_zero_shot_classifier, get_input_dtype
        from open_clip_train.precision import get_autocast

        self.model, self.device = model, torch.device(device)
        self.autocast = get_autocast(precision, device_type=self.device.type)
        self.input_dtype = get_input_dtype(precision)
        with self.autocast():
            self.head = build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=10,
                                                   device=self.device,
                                                   use_tqdm=progress and sys.stderr.isatty()).float()

    @torch.no_grad()
    def topk(self, images, k):
        with self.autocast():
            features = self.model.encode_image(images.to(self.device, dtype=self.input_dtype), normalize=True)
        logits = features.float() @ self.head
        return logits.topk(min(k, logits.shape[1]), dim=1).indices.cpu()


def class_index(classnames, name, what):
    lowered = [c.lower() for c in classnames]
    if name is None or name.lower() not in lowered:
        raise EvaluationError(f"the attack card's {what} {name!r} is not among the {len(classnames)} class names; "
                              "pass the class names the attack used with --classnames")
    return lowered.index(name.lower())


def cards_by_kind(cards):
    """At most one backdoor and one targeted card (a training set may carry both attacks)."""
    by_kind = {}
    for card in cards:
        if card["kind"] in by_kind:
            raise EvaluationError(f"two {card['kind']} attack cards given; pass at most one of each kind")
        by_kind[card["kind"]] = card
    return by_kind.get("backdoor"), by_kind.get("targeted")


def evaluate_model(model, preprocess, tokenizer, test_set, classnames, templates, cards=(), batch_size=256,
                   workers=0, device="cpu", precision="fp32", progress=True):
    """Zero-shot top-1/top-5 on `test_set`, plus backdoor and/or targeted ASR for the attack `cards`."""
    model.eval()
    backdoor_card, targeted_card = cards_by_kind(cards)
    zero_shot = ZeroShot(model, tokenizer, classnames, templates, device, precision, progress)
    backdoor = backdoor_card is not None
    target = class_index(classnames, backdoor_card["target"], "target") if backdoor else None
    prepare = Prepared(preprocess, backdoor_card)
    total = top1 = top5 = triggered = hits = untriggered_hits = 0
    # per true class: where a residual backdoor sits (classes that look like the target, or all of them)
    triggered_by_class = torch.zeros(len(classnames), dtype=torch.long)
    hits_by_class = torch.zeros(len(classnames), dtype=torch.long)
    batches = test_loader(test_set, prepare, batch_size, workers)
    for clean, trigger, labels in cli.progress(batches, enabled=progress, desc="evaluate", unit="batch"):
        if labels.min() < 0 or labels.max() >= len(classnames):
            raise EvaluationError(f"{test_set.name}: label {int(labels.max())} outside the {len(classnames)} class "
                                  "names; pass matching --classnames")
        predicted = zero_shot.topk(clean, 5)
        total += len(labels)
        top1 += int((predicted[:, 0] == labels).sum())
        top5 += int((predicted == labels[:, None]).any(dim=1).sum())
        if backdoor:
            eligible = labels != target
            if eligible.any():
                attacked = zero_shot.topk(trigger[eligible], 1)[:, 0]
                triggered += int(eligible.sum())
                hits += int((attacked == target).sum())
                triggered_by_class += torch.bincount(labels[eligible], minlength=len(classnames))
                hits_by_class += torch.bincount(labels[eligible][attacked == target], minlength=len(classnames))
                untriggered_hits += int((predicted[eligible, 0] == target).sum())
    if total == 0:
        raise EvaluationError(f"{test_set.name}: no test samples")
    result = {"test_data": test_set.name, "num_test": total, "num_classes": len(classnames),
              "top1": top1 / total, "top5": top5 / total if len(classnames) > 5 else None,
              "backdoor": None, "targeted": None}
    if backdoor:
        result["backdoor"] = {"attack": backdoor_card["attack"], "target": backdoor_card["target"],
                              "num_triggered": triggered, "asr": hits / triggered if triggered else None,
                              # the same images without the trigger: what a weak model calls the target anyway
                              "untriggered_rate": untriggered_hits / triggered if triggered else None,
                              "by_class": {classnames[c]: {"triggered": int(triggered_by_class[c]),
                                                           "hits": int(hits_by_class[c])}
                                           for c in range(len(classnames)) if triggered_by_class[c]}}
    if targeted_card is not None:
        result["targeted"] = targeted_success(zero_shot, preprocess, targeted_card, classnames)
    return result


def targeted_success(zero_shot, preprocess, card, classnames):
    """Each target image's top-1 against its adversarial class."""
    targets = target_samples(card)
    if not targets:
        raise EvaluationError("the attack card lists no target images")
    images = torch.stack([preprocess(target["image"]) for target in targets])
    predicted = zero_shot.topk(images, 1)[:, 0].tolist()
    rows = []
    for target, prediction in zip(targets, predicted):
        adversarial = class_index(classnames, target["adversarial"], "adversarial class")
        rows.append({"key": target["key"], "class": target["class"], "adversarial": target["adversarial"],
                     "predicted": classnames[prediction], "success": prediction == adversarial})
    return {"attack": card["attack"], "num_targets": len(rows), "asr": sum(r["success"] for r in rows) / len(rows),
            "targets": rows}


# ---------------------------------------------------------------- report


BY_CLASS_SHOWN = 5  # the table's line names the classes with the most hits; --output has them all


def result_table(result):
    rows = [("test set", f"{result['test_data']} ({result['num_test']} images, {result['num_classes']} classes)"),
            ("zero-shot top-1", percent(result["top1"])), ("zero-shot top-5", percent(result["top5"]))]
    if result["backdoor"]:
        b = result["backdoor"]
        rows.append((f"backdoor ASR ({b['attack']} -> {b['target']})",
                     f"{percent(b['asr'])} of {b['num_triggered']} triggered images (without the trigger: "
                     f"{percent(b['untriggered_rate'])})"))
        most = sorted(((row["hits"], name, row["triggered"]) for name, row in b["by_class"].items() if row["hits"]),
                      key=lambda hit: (-hit[0], hit[1]))
        if most:
            shown = ", ".join(f"{name} {hits} of {count}" for hits, name, count in most[:BY_CLASS_SHOWN])
            more = f" (+{len(most) - BY_CLASS_SHOWN} more classes)" if len(most) > BY_CLASS_SHOWN else ""
            rows.append(("backdoor hits by true class", shown + more))
    if result["targeted"]:
        t = result["targeted"]
        hits = sum(row["success"] for row in t["targets"])
        rows.append(("targeted ASR", f"{percent(t['asr'])} ({hits} of {t['num_targets']} targets)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


# ---------------------------------------------------------------- CLI


def parse_args(argv):
    parser = Parser("evaluate", __doc__.split("\n\n")[0])
    parser.add_argument("--model", help="open_clip model name (e.g. safeclip-tiny, RN50).")
    parser.add_argument("--checkpoint", help="Checkpoint file (open_clip or open_clip_safe training output) or an "
                                             "open_clip pretrained tag.")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--world", help="A built-in world folder: evaluate on its test split with its class names.")
    data.add_argument("--test-data", help="Labelled test set: a folder of class sub-folders, a CSV/TSV with image "
                                          "path and label columns, or webdataset shards with a cls field.")
    parser.add_argument("--csv-img-key", default="filepath", help="CSV column with image paths.")
    parser.add_argument("--csv-label-key", default="label", help="CSV column with integer labels.")
    parser.add_argument("--csv-separator", default="\t", help="CSV separator.")
    parser.add_argument("--classnames", help="Class names, one per line (default: the world's, else open_clip's "
                                             "ImageNet names).")
    parser.add_argument("--templates", help="Prompt templates with '{}', one per line (default: the world's, else "
                                            "open_clip's OpenAI ImageNet templates).")
    parser.add_argument("--attack-card", nargs="+", default=[],
                        help="attack.json (or its folder) from open_clip_safe.attacks: adds backdoor and/or targeted "
                             "attack success (at most one card of each kind).")
    parser.add_argument("--similarity-logs", help="A SafeCLIP run's log folder (LOGS/NAME): per-epoch split "
                                                  "diagnostics and plots.")
    parser.add_argument("--plots-dir", help="Where the diagnostic plots go (default: RUN_LOG_DIR/diagnostics).")
    parser.add_argument("--output", help="Write the results as JSON to this file.")
    parser.add_argument("--batch-size", type=int, default=256, help="Images per batch.")
    parser.add_argument("--workers", type=int, default=0, help="Data-loader worker processes.")
    add_device_flags(parser)
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    args = resolve_precision(parser.parse_args(argv))
    if args.model is None and args.similarity_logs is None:
        parser.error("nothing to do: give --model/--checkpoint with --world or --test-data, and/or --similarity-logs")
    if args.model is not None:
        if args.checkpoint is None:
            parser.error("--model needs --checkpoint (a file or an open_clip pretrained tag)")
        if args.world is None and args.test_data is None:
            parser.error("--model needs a test set: --world DIR or --test-data PATH")
    elif args.checkpoint or args.world or args.test_data or args.attack_card:
        parser.error("--checkpoint, --world, --test-data and --attack-card need --model")
    if args.batch_size < 1 or args.workers < 0:
        parser.error("--batch-size must be at least 1 and --workers at least 0")
    return args


def load_model(args):
    import open_clip

    from open_clip_safe import register_model_configs

    register_model_configs()

    if args.model not in open_clip.list_models():
        raise EvaluationError(f"--model {args.model}: unknown open_clip model")
    if not os.path.isfile(args.checkpoint) and args.checkpoint not in open_clip.list_pretrained_tags_by_model(args.model):
        raise EvaluationError(f"--checkpoint {args.checkpoint}: no such file, and not a pretrained tag of {args.model}")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.checkpoint,
                                                                     precision=args.precision, device=args.device)
    except (RuntimeError, KeyError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvaluationError(f"--checkpoint {args.checkpoint} does not load into {args.model}: {first}") from error
    return model, preprocess, open_clip.get_tokenizer(args.model)


def run(args):
    result = {}
    if args.model is not None:
        cards = [load_attack_card(path) for path in args.attack_card]
        test_set = load_test_set(args)
        classnames, templates = class_names_and_templates(args, test_set)
        model, preprocess, tokenizer = load_model(args)
        result = evaluate_model(model, preprocess, tokenizer, test_set, classnames, templates, cards, args.batch_size,
                                args.workers, args.device, args.precision, progress=not args.quiet)
        result.update(model=args.model, checkpoint=args.checkpoint)
        print(result_table(result))
    if args.similarity_logs:
        from open_clip_safe import diagnostics

        rows, arrays = diagnostics.split_diagnostics(args.similarity_logs)
        plots_dir = args.plots_dir or os.path.join(args.similarity_logs, "diagnostics")
        result["split_diagnostics"] = rows
        result["plots"] = diagnostics.plot_diagnostics(rows, arrays, plots_dir)
        print(("\n" if args.model else "") + diagnostics.diagnostics_table(rows))
        print(f"plots: {plots_dir}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


def main(argv=None):
    # ValueError and FileNotFoundError: an unusable attack card or similarity log, named by its path
    return guarded("evaluate", lambda: run(parse_args(sys.argv[1:] if argv is None else argv)),
                   errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
