"""The attack card (`attack.json` beside the poisoned data): what the evaluation needs to measure an
attack, i.e. the exact trigger (rebuilt from parameters, not pixels) or the targeted images.

Paths in a card are relative to its folder, so a copied folder still works; `load_attack_card` adds
`dir` (the folder, absolute) and re-points `train_data` into that folder.
"""
import functools
import json
import os
from pathlib import Path

from PIL import Image

from .triggers import make_trigger

CARD_NAME = "attack.json"
REQUIRED = ("attack", "kind", "seed", "target", "trigger", "format", "train_data", "num_samples",
            "num_poisoned", "poisoned_keys_file")


def load_attack_card(path):
    """The card at `path` (attack.json or its folder) as a dict; ValueError naming the file if unusable."""
    path = Path(path)
    file = path if path.suffix == ".json" and not path.is_dir() else path / CARD_NAME
    try:
        card = json.loads(file.read_text())
    except OSError as error:
        raise ValueError(f"{file}: cannot read the attack card ({error.strerror or error})") from None
    except ValueError as error:
        raise ValueError(f"{file}: not a valid attack card (bad JSON: {error})") from None
    if not isinstance(card, dict):
        raise ValueError(f"{file}: not a valid attack card (not a JSON object)")
    missing = [field for field in REQUIRED if field not in card]
    if missing:
        raise ValueError(f"{file}: not a valid attack card (missing {', '.join(missing)})")
    if card["kind"] == "backdoor" and not isinstance(card["trigger"], dict):
        raise ValueError(f"{file}: not a valid attack card (a backdoor card needs a trigger)")
    if card["kind"] == "targeted" and not isinstance(card.get("targets"), list):
        raise ValueError(f"{file}: not a valid attack card (a targeted card needs targets)")
    card["dir"] = str(file.resolve().parent)
    card["train_data"] = os.path.join(card["dir"], os.path.basename(card["train_data"]))
    return card


@functools.lru_cache(maxsize=16)
def _trigger(params_json, base_dir):
    return make_trigger(json.loads(params_json), base_dir)


def apply_trigger(card, image, key):
    """`image` (PIL, any size) with the card's trigger stamped on; `key` places a random patch.
    The builder stamps every poisoned image through this very function."""
    if card.get("kind") != "backdoor":
        raise ValueError(f"attack {card.get('attack')!r} is not a backdoor: it has no trigger")
    trigger = _trigger(json.dumps(card["trigger"], sort_keys=True), card.get("dir", "."))
    return trigger(image.convert("RGB"), key)


def target_samples(card):
    """The targeted attack's test images with their true and adversarial classes."""
    if card.get("kind") != "targeted":
        raise ValueError(f"attack {card.get('attack')!r} is not a targeted attack: it has no targets")
    samples = []
    for target in card["targets"]:
        with Image.open(Path(card.get("dir", ".")) / target["image"]) as image:
            rgb = image.convert("RGB")
        samples.append({"key": target["key"], "image": rgb, "label": target["label"], "class": target["class"],
                        "adversarial": target["adversarial"], "adversarial_label": target["adversarial_label"]})
    return samples
