"""Simulated poisoning attacks on CLIP training data: backdoor triggers and targeted poisoning.

`python -m open_clip_safe.attacks` builds a poisoned copy of a training set and an attack card;
the evaluation rebuilds the attack from the card with the functions below.
"""
from .card import apply_trigger, load_attack_card, target_samples

__all__ = ["apply_trigger", "load_attack_card", "target_samples"]
