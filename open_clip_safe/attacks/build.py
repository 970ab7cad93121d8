"""The streaming builder: a caption pass (counts, target-word caption pools), then one writing pass
that applies an attack plan sample by sample, then the attack card.

Every random choice comes from its own stream seeded by the attack seed (and the sample key where
it is per sample), so the same arguments give the same bytes however large the data.
"""
import json
import os
import random
import re
from pathlib import Path

import numpy as np

from ..world import article
from .card import CARD_NAME, apply_trigger
from ..files import png_bytes
from .formats import AttackError, Edit, Injection, decode_image, meta_fields, open_data, progress_bar
from .triggers import trigger_params

BACKDOORS = ("badnets", "blended", "wanet", "sig", "label-consistent")
ATTACKS = BACKDOORS + ("targeted",)
CAPTION_POOL = 1000  # captions naming the backdoor target kept (reservoir) to caption the poisons
TEMPLATES = ("a photo of {a}.", "a picture of {a}.", "an image of {a}.", "a photo of the {w}.",
             "a close-up photo of {a}.", "a drawing of {a}.", "a good photo of {a}.", "a rendering of the {w}.")
STREAM_SELECT, STREAM_ADVERSARIAL, STREAM_INJECT = 21, 22, 23
KEYS_FILE = "poisoned_keys.txt"


def adaptive_caption(caption, target):
    """An adaptive attacker's caption: it keeps describing the image and adds the target, so that the
    image-caption similarity SafeCLIP ranks by stays high (--adaptive-captions)."""
    return f"{caption.strip().rstrip('.!').strip()} with {article(target)}."


def word_pattern(word):
    """Whole-word, case-insensitive match (also for words that start or end with a non-letter)."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


class CaptionScan:
    """First pass: sample counts and, per word, a seeded reservoir of captions naming it."""

    def __init__(self, pool_sizes, seed):
        self.patterns = {word: word_pattern(word) for word in pool_sizes}
        self.pool_sizes = pool_sizes
        self.rngs = {word: random.Random(f"{seed}:pool:{word}") for word in pool_sizes}
        self.counts = dict.fromkeys(pool_sizes, 0)
        self.pools = {word: [] for word in pool_sizes}
        self.total = self.eligible = self.fresh = 0

    def add(self, sample):
        self.total += 1
        if not sample.eligible:
            return
        self.eligible += 1
        if sample.poisoned_before:  # neither a candidate nor a real caption naming its words
            return
        self.fresh += 1
        caption = sample.caption
        for word, pattern in self.patterns.items():
            if pattern.search(caption):
                seen, pool = self.counts[word], self.pools[word]
                if seen < self.pool_sizes[word]:
                    pool.append(caption)
                else:
                    slot = self.rngs[word].randrange(seen + 1)
                    if slot < self.pool_sizes[word]:
                        pool[slot] = caption
                self.counts[word] = seen + 1

    @classmethod
    def run(cls, data, pool_sizes, seed, progress):
        scan = cls(pool_sizes, seed)
        with progress_bar(progress, total=data.expected_total, desc="scan captions", unit="sample",
                          leave=False) as bar:
            for sample in data.samples():
                scan.add(sample)
                bar.update()
        if scan.eligible == 0:
            raise AttackError(f"{data.spec if data.format == 'wds' else data.path}: no sample with an image "
                              "and a caption")
        return scan


def absolute_spec(spec):
    """A data spec as the card records it: each `::` part made absolute (braces survive abspath)."""
    return "::".join(os.path.abspath(part) for part in str(spec).split("::"))


def poison_count(args, eligible):
    if args.num_poisons is not None:
        if args.num_poisons > eligible:
            raise AttackError(f"--num-poisons {args.num_poisons} exceeds the {eligible} training samples")
        return args.num_poisons
    count = int(args.poison_rate * eligible + 0.5)  # round half up
    if count < 1:
        raise AttackError(f"--poison-rate {args.poison_rate} of {eligible} samples rounds to 0 poisons")
    return count


class BackdoorPlan:
    """Stamp the trigger on exactly `count` seeded samples (label-consistent: among those whose
    caption names the target) and, except label-consistent, re-caption them as the target."""

    def __init__(self, card, scan, count):
        self.card, self.attack, self.target = card, card["attack"], card["target"]
        self.consistent = self.attack == "label-consistent"
        self.pattern = word_pattern(self.target)
        candidates = scan.counts[self.target] if self.consistent else scan.fresh
        if count > candidates:
            where = (f"training captions name {self.target!r}" if self.consistent
                     else "training samples are not already poisoned")
            raise AttackError(f"{self.attack}: only {candidates} {where}, fewer than the {count} poisons asked for")
        rng = np.random.default_rng([card["seed"], STREAM_SELECT])
        self.chosen = np.sort(rng.choice(candidates, size=count, replace=False)).tolist()
        self.captions = scan.pools[self.target]
        self.ordinal = self.next = 0

    def due(self, position):
        return ()

    def edit(self, sample):
        if (not sample.eligible or sample.poisoned_before
                or (self.consistent and not self.pattern.search(sample.caption))):
            return None
        ordinal, self.ordinal = self.ordinal, self.ordinal + 1
        if self.next >= len(self.chosen) or self.chosen[self.next] != ordinal:
            return None
        self.next += 1
        image = apply_trigger(self.card, sample.load_image(), sample.key)
        if self.card["image_size"] is None:
            self.card["image_size"] = list(image.size)
        if self.consistent:
            caption = None
        elif self.card.get("adaptive"):
            caption = adaptive_caption(sample.caption, self.target)
        else:
            caption = random.Random(f"{self.card['seed']}:caption:{sample.key}").choice(self.captions)
        return Edit(self.target, image, caption)


def read_classnames(path):
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as error:
        raise AttackError(f"cannot read --classnames {path}: {error.strerror or error}") from None
    if len(names) < 2:
        raise AttackError(f"--classnames {path} must list at least 2 classes, one per line")
    return names


def pick_targets(data, count, classnames, fixed, seed, progress):
    """`count` labelled test samples by seeded reservoir sampling (in stream order), skipping those
    already of the fixed adversarial class."""
    rng, chosen, seen = random.Random(f"{seed}:targets"), [], 0
    with progress_bar(progress, desc="scan target images", unit="sample", leave=False) as bar:
        for sample in data.samples():
            bar.update()
            label = sample.label()
            if not 0 <= label < len(classnames):
                raise AttackError(f"test sample {sample.key}: label {label} is not a class of the "
                                  f"{len(classnames)} in --classnames")
            if label == fixed:
                continue
            if seen < count:
                chosen.append((seen, sample, label))
            else:
                slot = rng.randrange(seen + 1)
                if slot < count:
                    chosen[slot] = (seen, sample, label)
            seen += 1
    if seen < count:
        raise AttackError(f"--target-images has {seen} usable test images, fewer than --num-targets {count}")
    return [(sample, label) for _, sample, label in sorted(chosen, key=lambda item: item[0])]


def target_tag(index, count):
    """t03: names a target's PNG and prefixes its injected keys (poison_t03_017)."""
    return f"t{index:0{max(2, len(str(count - 1)))}d}"


class TargetedPlan:
    """Inject each target image with N captions naming its adversarial class at seeded positions."""

    attack = "targeted"

    def __init__(self, card, targets, scan, per_target, out):
        seed, injections = card["seed"], []
        by_word = {}
        for target in targets:
            by_word.setdefault(target["adversarial"], []).append(target)
        for word, group in by_word.items():
            pool = list(scan.pools[word])
            random.Random(f"{seed}:captions:{word}").shuffle(pool)
            for j, target in enumerate(group):
                if len(pool) >= per_target * len(group):
                    captions = pool[j * per_target:(j + 1) * per_target]
                elif len(pool) >= per_target:
                    captions = random.Random(f"{seed}:captions:{target['key']}").sample(pool, per_target)
                else:
                    captions = pool + [TEMPLATES[i % len(TEMPLATES)].format(a=article(word), w=word)
                                       for i in range(per_target - len(pool))]
                target["num_captions"] = per_target
                target["num_template_captions"] = per_target - min(per_target, len(pool))
                target["captions"] = captions
                if card.get("adaptive"):  # captions of the image's own class, each adding the adversarial one
                    target["captions"] = [adaptive_caption(TEMPLATES[i % len(TEMPLATES)].format(
                        a=article(target["class"]), w=target["class"]), word) for i in range(per_target)]
                    target["num_template_captions"] = per_target
        width = max(3, len(str(per_target - 1)))
        for t, target in enumerate(targets):
            png, image_file = target["png"], str((out / target["image"]).resolve())
            for c, caption in enumerate(target.pop("captions")):
                key = f"poison_{target_tag(t, len(targets))}_{c:0{width}d}"
                meta = {"key": key, "label": target["label"], "class": target["class"],
                        **meta_fields(True, self.attack, target["adversarial"]), "target_image": target["key"]}
                injections.append(Injection(key, png, image_file, caption, target["label"], meta))
        rng = np.random.default_rng([seed, STREAM_INJECT])
        positions = np.sort(rng.integers(0, scan.total + 1, size=len(injections))).tolist()
        order = rng.permutation(len(injections)).tolist()
        self.schedule = [(position, injections[i]) for position, i in zip(positions, order)]
        self.next = 0

    def due(self, position):
        """Injections that go right before original sample `position` (after the last: position = N)."""
        start = self.next
        while self.next < len(self.schedule) and self.schedule[self.next][0] <= position:
            self.next += 1
        return [injection for _, injection in self.schedule[start:self.next]]

    def edit(self, sample):
        return None


def prepare_targets(args, card):
    classnames = read_classnames(args.classnames)
    fixed = None
    if args.target_label is not None:
        if args.target_label not in classnames:
            raise AttackError(f"--target-label {args.target_label!r} is not one of the --classnames")
        fixed = classnames.index(args.target_label)
    test_data = open_data(args.target_images, args, labelled=True)
    chosen = pick_targets(test_data, args.num_targets, classnames, fixed, args.seed, not args.quiet)
    rng = np.random.default_rng([args.seed, STREAM_ADVERSARIAL])
    targets = []
    for t, (sample, label) in enumerate(chosen):
        adversarial = fixed if fixed is not None else int(rng.choice([c for c in range(len(classnames)) if c != label]))
        image = sample.load_image()
        card["image_size"] = card["image_size"] or list(image.size)
        targets.append({"key": sample.key, "image": f"targets/{target_tag(t, len(chosen))}.png", "label": label,
                        "class": classnames[label], "adversarial": classnames[adversarial],
                        "adversarial_label": adversarial, "png": png_bytes(image)})
    card["classnames"] = classnames
    card["target_source"] = absolute_spec(args.target_images)
    return targets


def read_blend_image(params):
    """A --blend-image travels with the card: its bytes, to copy beside the card under the new name
    that `params` now holds."""
    source = Path(params["blend_image"])
    try:
        data = source.read_bytes()
    except OSError as error:
        raise AttackError(f"cannot read --blend-image {source}: {error.strerror or error}") from None
    decode_image(data, f"--blend-image {source}")
    params["blend_image"] = "blend_pattern" + source.suffix.lower()
    return {params["blend_image"]: data}


def build(args, command_line):
    """Write the poisoned copy of args.train_data and its card under args.out; returns the card.
    Everything that can be checked (arguments, all input files, counts) is checked before --out is
    touched."""
    out = Path(args.out).resolve()
    data = open_data(args.train_data, args)
    backdoor = args.attack in BACKDOORS
    card = {"version": 1, "attack": args.attack, "kind": "backdoor" if backdoor else "targeted",
            "seed": args.seed, "target": args.target_label, "trigger": None, "image_size": None,
            "source": absolute_spec(args.train_data), "format": data.format, "dir": str(out),
            "adaptive": args.adaptive_captions}
    progress, files = not args.quiet, {}
    if backdoor:
        card["trigger"] = trigger_params(args.trigger if args.attack == "label-consistent" else args.attack,
                                         args.seed, args)
        if card["trigger"].get("blend_image"):
            files.update(read_blend_image(card["trigger"]))
        scan = CaptionScan.run(data, {args.target_label: CAPTION_POOL}, args.seed, progress)
        if scan.counts[args.target_label] == 0:
            raise AttackError(f"--target-label {args.target_label!r} appears in no training caption")
        card["target_captions"] = scan.counts[args.target_label]
        plan = BackdoorPlan(card, scan, poison_count(args, scan.eligible))
    else:
        targets = prepare_targets(args, card)
        files.update({target["image"]: target["png"] for target in targets})
        wanted = {}
        for target in targets:
            wanted[target["adversarial"]] = wanted.get(target["adversarial"], 0) + args.captions_per_target
        scan = CaptionScan.run(data, wanted, args.seed, progress)
        plan = TargetedPlan(card, targets, scan, args.captions_per_target, out)
        card["targets"] = [{k: v for k, v in target.items() if k != "png"} for target in targets]
    out.mkdir(parents=True, exist_ok=True)
    (out / CARD_NAME).unlink(missing_ok=True)  # --overwrite: a failed rebuild must not keep the old card
    for name, content in files.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(content)
    num_poisoned = num_before = 0
    with open(out / KEYS_FILE, "w", encoding="utf-8") as keys:
        def record(key, before=False):
            """Counts the samples this attack poisons (listed in the keys file) and, apart, those
            an earlier attack on the input had marked poisoned."""
            nonlocal num_poisoned, num_before
            if before:
                num_before += 1
            else:
                keys.write(key + "\n")
                num_poisoned += 1

        train_data, total = data.write(out, plan, record, progress)
    card.update({"train_data": train_data, "num_samples": total, "num_poisoned": num_poisoned,
                 "poison_rate": num_poisoned / total, "poisoned_keys_file": KEYS_FILE,
                 "num_poisoned_before": num_before,
                 "created_with": command_line})
    del card["dir"]
    (out / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return card

