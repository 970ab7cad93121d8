"""SafeCLIP's schedule: phases by epoch, the safe/risky split, the safe fraction and the learning-rate plan.

Epochs are 0-based, as open_clip counts (the authors count from 1): epochs [0, E_in) are the
in-modal warm-up, [E_in, E_in + E_cross) the cross-modal warm-up, every later one is mixed.
Everything here is plain numpy on rank 0's side; the training loop broadcasts the split.
"""
import logging
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import NamedTuple, Optional

import numpy as np
from open_clip_train.scheduler import cosine_lr

PHASES = ("inmodal", "crossmodal", "mixed")
GMM_MAX_FIT_SAMPLES = 1_000_000


def phase_of(epoch, inmodal_epochs, crossmodal_epochs):
    if epoch < inmodal_epochs:
        return "inmodal"
    if epoch < inmodal_epochs + crossmodal_epochs:
        return "crossmodal"
    return "mixed"


SEPARATED = 2.0  # Ashman's D above which a 2-component mixture is bimodal (Ashman et al., 1994)


def gmm_clean_probability(similarity, max_fit_samples=GMM_MAX_FIT_SAMPLES, seed=0, chunk=1 << 20):
    """Posterior of the higher-mean component of a 2-component 1-D Gaussian mixture, per sample.

    The mixture is fitted on a fixed-seed random subset of at most `max_fit_samples` (1-D, two
    components: a million samples pin the five parameters far beyond what the split needs) and
    evaluated on every sample `chunk` at a time, so 10^7 similarities take seconds and no more
    memory than the float32 result.
    """
    return gmm_fit(similarity, max_fit_samples, seed, chunk)[0]


def gmm_fit(similarity, max_fit_samples=GMM_MAX_FIT_SAMPLES, seed=0, chunk=1 << 20):
    """gmm_clean_probability, and how far the mixture's components stand apart: Ashman's
    D = sqrt(2) |mu1 - mu2| / sqrt(var1 + var2); below SEPARATED the "clean" component is only the
    upper half of one hump, not a group of its own."""
    from sklearn.mixture import GaussianMixture  # here: scikit-learn takes seconds to import

    similarity = np.asarray(similarity).reshape(-1)
    fit_on = similarity
    if len(similarity) > max_fit_samples:
        fit_on = similarity[np.random.default_rng(seed).choice(len(similarity), max_fit_samples, replace=False)]
    mixture = GaussianMixture(n_components=2, random_state=seed).fit(np.asarray(fit_on, np.float64).reshape(-1, 1))
    clean = mixture.means_.argmax()
    out = np.empty(len(similarity), dtype=np.float32)
    for begin in range(0, len(similarity), chunk):
        part = np.asarray(similarity[begin:begin + chunk], np.float64).reshape(-1, 1)
        out[begin:begin + chunk] = mixture.predict_proba(part)[:, clean]
    means, variances = mixture.means_.reshape(-1), mixture.covariances_.reshape(-1)
    return out, float(np.sqrt(2) * abs(means[0] - means[1]) / np.sqrt(variances.sum()))


def top_fraction_mask(score, fraction, tiebreak=None):
    """The round(fraction * n) highest scores; ties go to the higher `tiebreak`, then to the lower index.

    Clean probabilities saturate at exactly 1.0 for much of the data, so without a tie-break
    "top f by clean probability" would be decided by sample order; the similarity breaks it. A
    partition finds the cut, so only the samples tied at it are sorted (not all n).
    """
    score = np.asarray(score)
    count = int(round(fraction * len(score)))
    mask = np.zeros(len(score), dtype=bool)
    if count == 0:
        return mask
    cut = np.partition(score, len(score) - count)[len(score) - count]
    np.greater(score, cut, out=mask)
    tied = np.flatnonzero(score == cut)
    if tiebreak is not None:
        tied = tied[np.argsort(-np.asarray(tiebreak)[tied], kind="stable")]
    mask[tied[:count - int(mask.sum())]] = True
    return mask


# The flag behind each schedule setting a state file records (SafeclipSchedule.config).
SETTING_FLAGS = {"method": "--safeclip-split", "first_threshold": "--safeclip-first-split-threshold",
                 "fraction_start": "--safeclip-safe-fraction-start", "fraction_step": "--safeclip-safe-fraction-step",
                 "fraction_max": "--safeclip-safe-fraction-max", "update_freq": "--safeclip-update-freq",
                 "auto_share": "--safeclip-safe-fraction-auto-share", "inmodal_epochs": "--safeclip-inmodal-epochs",
                 "crossmodal_epochs": "--safeclip-crossmodal-epochs", "epochs": "--epochs",
                 "num_samples": "the training set's sample count (--train-data, --train-num-samples)"}


def changed_settings(saved, now):
    """'FLAG saved X, now Y' for each schedule setting that differs between two configs."""
    def flat(config):
        return {**config.get("rule", {}), **{k: v for k, v in config.items() if k != "rule"}}

    def shown(value):
        return "auto" if value is None else value

    saved, now = flat(saved), flat(now)
    return [f"{SETTING_FLAGS.get(name, name)} saved {shown(saved.get(name))}, now {shown(now.get(name))}"
            for name in list(now) + [n for n in saved if n not in now] if saved.get(name) != now.get(name)]


@dataclass(frozen=True)
class SplitRule:
    """How mixed epochs split the data (the --safeclip-split ... --safeclip-update-freq flags).

    gmm: the first mixed epoch's safe set is every sample with clean probability >= first_threshold
    and its share is the first fraction f0, unless that split is blind (see `first_split`); topk:
    the top fraction_start by raw similarity. Mixed epoch m > 0 keeps the top
    min(fraction_max, f0 + step * (m // update_freq)) by the same score, so a gmm f0 above the cap
    falls to the cap at the next epoch. step is fraction_step, or with fraction_step None ("auto")
    the step that reaches fraction_max at the share auto_share of the mixed epochs.
    """

    method: str = "gmm"
    first_threshold: float = 0.9
    fraction_start: float = 0.15
    fraction_step: float = 0.01  # None: auto
    fraction_max: float = 0.85
    update_freq: int = 1
    auto_share: float = 0.5

    def step(self, first_fraction, mixed_epochs):
        if self.fraction_step is not None:
            return self.fraction_step
        if mixed_epochs is None:
            raise ValueError("an auto step needs the number of mixed epochs")
        # the last mixed epoch is mixed_epochs - 1: a share of 1 reaches the cap there
        updates = max(1, min(round(self.auto_share * mixed_epochs), mixed_epochs - 1) // self.update_freq)
        return max(0.0, (self.fraction_max - first_fraction) / updates)

    def fraction_at(self, mixed_epoch, first_fraction, mixed_epochs=None):
        if mixed_epoch == 0:
            return first_fraction
        step = self.step(first_fraction, mixed_epochs)
        return min(self.fraction_max, first_fraction + step * (mixed_epoch // self.update_freq))

    def score(self, similarity):
        """What samples are ranked by, and Ashman's D of the mixture: clean probability (gmm) or the
        similarity itself (topk, D None)."""
        if self.method == "gmm":
            return gmm_fit(similarity)
        return np.asarray(similarity, dtype=np.float32), None

    def first_split(self, score, similarity, separation):
        """The first gmm safe set, and why it fell back, if it did. The threshold split is blind when
        no sample reaches the threshold or the mixture does not separate (Ashman's D < SEPARATED):
        then the safe set is the top fraction_start by clean probability (ties by similarity)."""
        safe = score >= self.first_threshold
        if safe.any() and separation >= SEPARATED:
            return safe, None
        reason = (f"no sample reached clean probability {self.first_threshold:g}" if not safe.any() else
                  f"the mixture does not separate (Ashman's D {separation:.2f} < {SEPARATED:g}; "
                  f"{int(safe.sum())} samples reached clean probability {self.first_threshold:g})")
        return top_fraction_mask(score, self.fraction_start, tiebreak=similarity), reason


# The authors' CC1M run warms up cross-modally for one epoch of 1M / 256 = 3,906 steps at 5e-6; Adam moves
# each weight by about the learning rate a step, so that warm-up moves the weights about 0.02 in all.
AUTHORS_FILTER_LR, AUTHORS_EPOCH_STEPS = 5e-6, 3906


def auto_filter_lr(lr, crossmodal_steps):
    """--safeclip-filter-lr auto: the authors' rate, raised (at most to the CLIP lr) for a cross-modal
    warm-up of fewer steps than theirs, so that it moves the weights as far: at 5e-6, a warm-up of a
    few hundred steps leaves a from-scratch model unaligned and the first split blind (docs/defense.md)."""
    return max(AUTHORS_FILTER_LR, min(lr, AUTHORS_FILTER_LR * AUTHORS_EPOCH_STEPS / max(1, crossmodal_steps)))


def resolve_inmodal_lr(value, lr):
    """--safeclip-inmodal-lr: a number, "lr" (--lr itself, the authors' parser default), or None (auto):
    --lr / 5, the ratio of the authors' CC1M run (in-modal 1e-4 against cross-modal 5e-4)."""
    return lr if value == "lr" else lr / 5 if value is None else value


def auto_crossmodal_warmup(filter_lr, crossmodal_steps):
    """--safeclip-crossmodal-warmup auto: a ramp over half the cross-modal warm-up when its rate was
    raised (a high rate at the switch to the CLIP loss collapses a young model; see LrPlan)."""
    return crossmodal_steps // 2 if filter_lr > AUTHORS_FILTER_LR else 0


def cosine(base_lr, warmup, steps, step):
    """open_clip's cosine_lr (linear warm-up, cosine to 0 at `steps`) as a pure function of the step."""
    probe = SimpleNamespace(param_groups=[{}])  # cosine_lr assigns to an optimizer's groups
    return cosine_lr(probe, base_lr, warmup, max(steps, warmup + 1))(min(step, steps))


@dataclass
class LrPlan:
    """The learning rate of every step of a SafeCLIP run.

    Warm-up epochs: open_clip's cosine_lr shifted up by filter_lr: `warmup` linear steps from
    filter_lr to inmodal_lr, then a cosine down to filter_lr at the end of the in-modal epochs;
    then filter_lr for the cross-modal warm-up, reached by a linear ramp from 0 over its first
    `crossmodal_warmup` steps when that is not 0 (switching to the CLIP loss at a high filter_lr
    collapsed the demo's model: every caption embedded alike, loss stuck at ln(batch)).
    Mixed epochs: one cosine (to 0) for all risky sub-epochs at inmodal_lr and one for all safe
    sub-epochs at cross_lr, each sized ahead by `mixed_steps` (steps of every mixed epoch's risky /
    safe sub-epoch, from the expected safe fraction); None until a gmm run's first split fixes f0.
    """

    inmodal_lr: float
    cross_lr: float
    filter_lr: float
    warmup: int
    inmodal_epochs: int
    crossmodal_epochs: int
    steps_per_epoch: int
    mixed_steps: dict = None
    crossmodal_warmup: int = 0

    def warmup_steps_before(self, epoch):
        return min(epoch, self.inmodal_epochs + self.crossmodal_epochs) * self.steps_per_epoch

    def warmup_lr(self, step):
        """Learning rate of the `step`-th step (0-based) counted from the start of training."""
        inmodal_steps = self.inmodal_epochs * self.steps_per_epoch
        if step >= inmodal_steps:
            ramp = self.crossmodal_warmup
            return self.filter_lr * min(1.0, (step - inmodal_steps + 1) / ramp) if ramp else self.filter_lr
        return self.filter_lr + cosine(self.inmodal_lr - self.filter_lr, self.warmup, inmodal_steps, step)

    def sub_epoch_steps_before(self, epoch, part):
        return sum(self.sized(part)[:epoch - self.inmodal_epochs - self.crossmodal_epochs])

    def sub_epoch_lr(self, part, step):
        """Learning rate of the `step`-th step (0-based) of all `part` ("risky" / "safe") sub-epochs."""
        base_lr = self.inmodal_lr if part == "risky" else self.cross_lr
        return cosine(base_lr, 0, sum(self.sized(part)), step)

    def lr(self, epoch, part, step):
        """Learning rate of step `step` of epoch `epoch`'s `part`: inmodal, crossmodal, risky or safe."""
        if part in ("risky", "safe"):
            return self.sub_epoch_lr(part, self.sub_epoch_steps_before(epoch, part) + step)
        return self.warmup_lr(self.warmup_steps_before(epoch) + step)

    def sized(self, part):
        if self.mixed_steps is None:
            raise RuntimeError("the mixed epochs' learning rates are sized at the first split (gmm)")
        return self.mixed_steps[part]

    def summary(self):
        warmup_epochs = self.inmodal_epochs + self.crossmodal_epochs
        lines = [f"warm-up: {self.inmodal_epochs} in-modal + {self.crossmodal_epochs} cross-modal epochs of "
                 f"{self.steps_per_epoch} steps; {self.warmup} linear warm-up steps to {self.inmodal_lr:g}, cosine "
                 f"to {self.filter_lr:g} over {self.inmodal_epochs * self.steps_per_epoch} steps, then {self.filter_lr:g}"
                 + (f" after a {self.crossmodal_warmup}-step ramp from 0" if self.crossmodal_warmup else "")]
        if self.mixed_steps is None:
            lines.append("mixed epochs: sized at the first split")
        else:
            for part, lr in (("risky", self.inmodal_lr), ("safe", self.cross_lr)):
                steps = self.mixed_steps[part]
                lines.append(f"mixed {part}: cosine from {lr:g} over {sum(steps)} steps; per epoch from "
                             f"{warmup_epochs}: {steps}")
        return "\n".join(lines)


class Split(NamedTuple):
    safe: np.ndarray
    clean_prob: np.ndarray  # the mixture's posterior (gmm) or the similarity (topk)
    score: np.ndarray  # what ranked the samples: clean_prob, lowered for samples a second signal flags
    separation: Optional[float]  # Ashman's D of the mixture (gmm)
    fallback: Optional[str]  # why the first gmm split fell back to the top fraction_start, if it did

    def log_columns(self):
        """The similarity log's score columns: clean_prob, and score where it differs."""
        columns = {"clean_prob": self.clean_prob.astype(np.float32)}
        if self.score is not self.clean_prob:
            columns["score"] = self.score.astype(np.float32)
        return columns


class SafeclipSchedule:
    """Phases, split and learning-rate plan of one run, with a plain-dict state for exact resume.

    The mixed epochs' learning rates are sized from `num_samples` (from --train-num-samples or
    sizes.json) until the first split, and from then on from the samples the similarity pass saw.
    """

    def __init__(self, *, rule, inmodal_epochs, crossmodal_epochs, epochs, num_samples, steps_per_epoch,
                 steps_for, inmodal_lr, cross_lr, filter_lr, warmup, crossmodal_warmup=0):
        self.rule, self.inmodal_epochs, self.crossmodal_epochs, self.epochs = rule, inmodal_epochs, crossmodal_epochs, epochs
        self.num_samples, self.steps_for = num_samples, steps_for
        self.lr_args = dict(inmodal_lr=inmodal_lr, cross_lr=cross_lr, filter_lr=filter_lr, warmup=warmup,
                            inmodal_epochs=inmodal_epochs, crossmodal_epochs=crossmodal_epochs,
                            steps_per_epoch=steps_per_epoch, crossmodal_warmup=crossmodal_warmup)
        self.first_fraction = rule.fraction_start if rule.method == "topk" else None
        self.samples_seen = None  # by the first similarity pass
        self.fraction = None
        self.last_split_epoch = None
        self._plan = None

    @classmethod
    def from_args(cls, args, data):
        """From open_clip's args with the SafeCLIP flags and the SafeclipData of the training set."""
        rule = SplitRule(method=args.safeclip_split, first_threshold=args.safeclip_first_split_threshold,
                         fraction_start=args.safeclip_safe_fraction_start,
                         fraction_step=args.safeclip_safe_fraction_step, fraction_max=args.safeclip_safe_fraction_max,
                         update_freq=args.safeclip_update_freq, auto_share=args.safeclip_safe_fraction_auto_share)
        steps_per_epoch = data.dataloader.num_batches
        crossmodal_steps = args.safeclip_crossmodal_epochs * steps_per_epoch
        filter_lr, ramp = args.safeclip_filter_lr, args.safeclip_crossmodal_warmup
        if filter_lr is None:
            filter_lr = auto_filter_lr(args.lr, crossmodal_steps)
        if ramp is None:
            ramp = auto_crossmodal_warmup(filter_lr, crossmodal_steps)
        return cls(rule=rule, inmodal_epochs=args.safeclip_inmodal_epochs,
                   crossmodal_epochs=args.safeclip_crossmodal_epochs, epochs=args.epochs,
                   num_samples=data.num_samples, steps_per_epoch=steps_per_epoch, steps_for=data.batches_for,
                   inmodal_lr=resolve_inmodal_lr(args.safeclip_inmodal_lr, args.lr), cross_lr=args.lr,
                   filter_lr=filter_lr, warmup=args.warmup, crossmodal_warmup=ramp)

    @property
    def warmup_epochs(self):
        return self.inmodal_epochs + self.crossmodal_epochs

    @property
    def mixed_epochs(self):
        return self.epochs - self.warmup_epochs

    def fraction_at(self, mixed_epoch, first_fraction=None):
        first_fraction = self.first_fraction if first_fraction is None else first_fraction
        return self.rule.fraction_at(mixed_epoch, first_fraction, self.mixed_epochs)

    def clip_loss_share(self, first_fraction=None):
        """The CLIP loss's samples over the plan, as a share of what plain CLIP sees in as many epochs:
        (cross-modal epochs + the safe fractions of the mixed epochs) / epochs."""
        first_fraction = self.first_fraction if self.first_fraction is not None else first_fraction
        safe = sum(self.fraction_at(m, first_fraction) for m in range(self.mixed_epochs))
        return (self.crossmodal_epochs + safe) / max(1, self.epochs)

    def phase(self, epoch):
        return phase_of(epoch, self.inmodal_epochs, self.crossmodal_epochs)

    def expected_counts(self):
        """(safe, risky) sample counts of every mixed epoch, from f0, the fraction rule and the sample count."""
        total = self.samples_seen or self.num_samples
        counts = []
        for mixed_epoch in range(self.mixed_epochs):
            safe = int(round(self.fraction_at(mixed_epoch) * total))
            counts.append((safe, total - safe))
        return counts

    @property
    def plan(self):
        if self._plan is None:
            mixed_steps = None
            if self.first_fraction is not None:
                counts = self.expected_counts()
                mixed_steps = {"safe": [self.steps_for(safe) for safe, _ in counts],
                               "risky": [self.steps_for(risky) for _, risky in counts]}
            self._plan = LrPlan(**self.lr_args, mixed_steps=mixed_steps)
        return self._plan

    def split(self, epoch, similarity, flagged=None):
        """Mixed epoch `epoch`'s split from every sample's similarity (and, with a second signal, which
        samples it flags): a Split of the safe mask, the mixture's clean probability (the similarity
        under topk), the ranking score, and why the first split fell back, if it did.

        Flagged samples rank below every other (score = clean probability - 2), so they enter a safe
        set only when fewer unflagged samples remain than it holds. Records the split
        (`accept_split`); ranks that receive the mask instead must accept it too.
        """
        mixed_epoch = self.mixed_epoch(epoch)
        clean_prob, separation = self.rule.score(similarity)
        score = clean_prob if flagged is None else (clean_prob - 2.0 * flagged).astype(np.float32)
        fallback = None
        if mixed_epoch == 0 and self.rule.method == "gmm":
            safe, fallback = self.rule.first_split(score, similarity, separation)
            if fallback and flagged is not None and not (score >= self.rule.first_threshold).any():
                fallback += " that the second signal did not flag"
        else:
            if self.first_fraction is None:
                raise RuntimeError("no first split recorded: resume from a state saved after the first mixed epoch")
            safe = top_fraction_mask(score, self.fraction_at(mixed_epoch), tiebreak=similarity)
        self.accept_split(epoch, safe)
        return Split(safe, clean_prob, score, separation, fallback)

    def accept_split(self, epoch, safe):
        """Record epoch `epoch`'s split (safe mask), computed here or on another rank; idempotent.

        Every rank needs it: the first gmm split fixes f0, which sizes the learning-rate plan.
        """
        mixed_epoch = self.mixed_epoch(epoch)
        resize = False
        if self.samples_seen is None:
            self.samples_seen, resize = len(safe), len(safe) != self.num_samples
        if mixed_epoch == 0 and self.rule.method == "gmm":
            first_fraction = float(np.mean(safe)) if len(safe) else 0.0
            resize = resize or first_fraction != self.first_fraction
            self.first_fraction = first_fraction
        if resize:
            self._plan = None
            logging.info(f"SafeCLIP learning-rate plan:\n{self.plan.summary()}")
        self.fraction = self.fraction_at(mixed_epoch)
        self.last_split_epoch = epoch

    def mixed_epoch(self, epoch):
        if epoch < self.warmup_epochs:
            raise ValueError(f"epoch {epoch} is a warm-up epoch; the split starts at epoch {self.warmup_epochs}")
        return epoch - self.warmup_epochs

    def config(self):
        return {"rule": asdict(self.rule), "inmodal_epochs": self.inmodal_epochs,
                "crossmodal_epochs": self.crossmodal_epochs, "epochs": self.epochs, "num_samples": self.num_samples}

    def state_dict(self):
        return {"config": self.config(), "first_fraction": self.first_fraction, "fraction": self.fraction,
                "last_split_epoch": self.last_split_epoch, "samples_seen": self.samples_seen}

    def load_state_dict(self, state):
        """Continue a run; its schedule settings must be those it was saved with (the safe fractions and
        the learning-rate plan of the epochs already trained were drawn from them)."""
        changed = changed_settings(state["config"], self.config())
        if changed:
            raise ValueError(f"SafeCLIP cannot continue a schedule planned with other settings: {'; '.join(changed)}"
                             f" (resume with the saved values, or start a new run)")
        self.first_fraction, self.fraction = state["first_fraction"], state["fraction"]
        self.last_split_epoch, self.samples_seen, self._plan = state["last_split_epoch"], state["samples_seen"], None
