"""SafeCLIP's train_one_epoch, built on open_clip_train's helpers.

open_clip's own loop unpacks `images, texts = batch` and hands its loss only features, so SafeCLIP
needs its own: one DDP forward per step on both views concatenated, the in-modal or the CLIP loss,
and, in mixed epochs, the similarity pass, the split and the risky and safe sub-epochs.
"""
import logging
import math
import random
import time

import numpy as np
import torch
from open_clip_train.distributed import is_master
from open_clip import get_input_dtype
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import assign_learning_rate
from open_clip_train.train import AverageMeter, backward, unwrap_model
import open_clip_train.train as open_clip_train_train

from open_clip_safe import collectives, state
from open_clip_safe.cli import UsageError
from open_clip_safe.data import POISON_KINDS, SplitLookup
from open_clip_safe.diagnostics import clean_moved_to_risky, detector_line, detector_metrics
from open_clip_safe.neighbours import second_signal
from open_clip_safe.schedule import top_fraction_mask
from open_clip_safe.similarity import similarity_pass, write_log
from open_clip_safe.training_scores import TrainingScores, pair_cosines



class WandbOnTheRunStep:
    """wandb as open_clip_train.train sees it during a run of ours (docs/design.md#wandb-steps).

    open_clip's evaluate logs with step=batches-per-epoch x epoch; SafeCLIP's epochs differ in length
    (the pass, the safe subset), so that step falls behind or ahead of the training rows' step and wandb
    drops whichever row comes second. In a SafeCLIP run (`run` set) no row passes wandb's own step: each
    carries the run's global step as "step", the x axis of every train/ and val/ chart. Without one it
    passes every call through, as plain open_clip logs."""

    def __init__(self, wandb):
        self.wandb, self.run, self.defined = wandb, None, False

    def log(self, values, step=None, **kwargs):
        if self.run is None:
            return self.wandb.log(values, step=step, **kwargs)
        if not self.defined:
            self.wandb.define_metric("step")
            for prefix in ("train/*", "val/*"):
                self.wandb.define_metric(prefix, step_metric="step")
            self.defined = True
        return self.wandb.log({"step": self.run.global_step, **values}, **kwargs)

    def __getattr__(self, name):
        return getattr(self.wandb, name)


def log_on_the_run_step(run):
    """From here on, open_clip's wandb rows carry `run`'s global step (when main installed the proxy)."""
    if isinstance(open_clip_train_train.wandb, WandbOnTheRunStep):
        open_clip_train_train.wandb.run = run


def seed_epoch(args, epoch):
    """Reseed every RNG from (seed, epoch, rank): a resumed run replays the same augmentations."""
    seed = (args.seed * 100_003 + epoch) * 1_009 + args.rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def optimizer_step(model, optimizer, scaler, args):
    """The step part of open_clip's loop: optional unscale + clip, step, scaler update."""
    if scaler is not None:
        if args.grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm, norm_type=2.0)
        scaler.step(optimizer)
        scaler.update()
    else:
        if args.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm, norm_type=2.0)
        optimizer.step()


def report(args, tb_writer, values, step):
    """Scalars to tensorboard / wandb under train/, as open_clip names them; from the master only,
    where open_clip made the tensorboard writer and called wandb.init. wandb is open_clip's (in a run,
    WandbOnTheRunStep), so these rows and open_clip's evaluation rows share one step."""
    if not is_master(args):
        return
    values = {f"train/{name}": value for name, value in values.items()}
    if tb_writer is not None:
        for name, value in values.items():
            tb_writer.add_scalar(name, value, step)
    if args.wandb and open_clip_train_train.wandb is not None:
        open_clip_train_train.wandb.log({**values, "step": step})


def run_steps(model, loader, loss_fn, optimizer, scaler, lr_at, args, epoch, tag, run, tb_writer, scores=None,
              finish_images=None, unlearn=None):
    """Train on every batch of `loader` with `loss_fn`; `lr_at(i)` gives the i-th step's learning rate.
    `scores` (fast mode's TrainingScores) records every sample's image-caption cosine; `finish_images`
    (TwoViews.on_device) completes the image views on the device."""
    device = torch.device(args.device)
    autocast = get_autocast(args.precision, device_type=device.type)
    input_dtype = get_input_dtype(args.precision)
    both_views = loss_fn.needs_both_views
    model.train()
    meters = {}
    batch_time, data_time = AverageMeter(), AverageMeter()
    num_batches = loader.num_batches
    end = time.time()
    for i, (ids, image_v1, image_v2, text_v1, text_v2) in enumerate(loader):
        lr = lr_at(i)
        assign_learning_rate(optimizer, lr)
        images = on_device(device, image_v1, image_v2, both_views)
        texts = on_device(device, text_v1, text_v2, both_views)
        if finish_images is not None:
            images = finish_images(images)
        images = images.to(dtype=input_dtype)
        data_time.update(time.time() - end)
        optimizer.zero_grad()
        with autocast():
            out = model(images, texts)
            if both_views:
                image_v1, image_v2 = out["image_features"].chunk(2)
                text_v1, text_v2 = out["text_features"].chunk(2)
            else:
                image_v1 = image_v2 = out["image_features"]
                text_v1 = text_v2 = out["text_features"]
            losses = loss_fn(image_v1, image_v2, text_v1, text_v2, out["logit_scale"])
            if unlearn is not None:
                losses.update(unlearn(ids, image_v1, image_v2, text_v1, out["logit_scale"]))
            if scores is not None:
                scores.record(ids, pair_cosines(image_v1, image_v2, text_v1, text_v2))
            total = sum(losses.values())
            losses["loss"] = total
        backward(total, scaler)
        optimizer_step(model, optimizer, scaler, args)
        with torch.no_grad():
            unwrap_model(model).logit_scale.clamp_(0, math.log(100))
        batch_time.update(time.time() - end)
        end = time.time()
        run.global_step += 1
        done = i + 1
        if is_master(args) and (i % args.log_every_n_steps == 0 or done == num_batches):
            for name, value in losses.items():
                meters.setdefault(name, AverageMeter()).update(value.item(), len(image_v1))
            samples_per_second = len(image_v1) * args.world_size / batch_time.val
            loss_log = " ".join(f"{name.capitalize()}: {m.val:#.5g} ({m.avg:#.5g})" for name, m in meters.items())
            logging.info(
                f"Train Epoch: {epoch} {tag} [{done}/{num_batches} ({100.0 * done / num_batches:.0f}%)] "
                f"Data (t): {data_time.avg:.3f} Batch (t): {batch_time.avg:.3f}, {samples_per_second:#g}/s "
                f"LR: {lr:5f} Logit Scale: {out['logit_scale'].item():.3f} {loss_log}")
            report(args, tb_writer, {"lr": lr, "scale": out["logit_scale"].item(), "samples_per_second":
                                     samples_per_second, **{f"{tag}_{n}": m.val for n, m in meters.items()}},
                   run.global_step)
            batch_time.reset()
            data_time.reset()
    return {name: meter.avg for name, meter in meters.items()}


def on_device(device, view_1, view_2, both):
    """One batch of both views (or view 1) on the device: each copied, then joined there (no host copy)."""
    view_1 = view_1.to(device=device, non_blocking=True)
    return torch.cat([view_1, view_2.to(device=device, non_blocking=True)]) if both else view_1


def broadcast_mask(args, mask, count):
    """Rank 0's per-sample mask (the safe set, the suspects) to every rank, as packed bits over the host
    group: the split is made once, on rank 0."""
    if not args.distributed:
        return mask
    packed = collectives.broadcast_rows(args, np.packbits(mask) if args.rank == 0 else None, -(-count // 8),
                                        np.uint8)
    return np.unpackbits(packed, count=count).astype(bool)


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
    """One SafeCLIP epoch: warm-up epochs train on all samples, mixed epochs split them first.

    open_clip's scheduler is not used: SafeCLIP's learning-rate plan has one schedule per phase.
    """
    train = data["train"]
    run = train.run
    if run.pending_loss_state is not None:
        try:
            loss.load_state_dict(run.pending_loss_state)
        except RuntimeError as error:
            raise UsageError(f"--resume: the saved SafeCLIP loss state does not fit this run's flags "
                             f"(--safeclip-memory-bank-size changed?): {error}") from None
        run.pending_loss_state = None
    seed_epoch(args, epoch)
    phase = run.schedule.phase(epoch)
    if is_master(args):
        logging.info(f"SafeCLIP epoch {epoch}: {phase} phase")
    if phase != "mixed":
        loss_fn = loss.inmodal if phase == "inmodal" else loss.clip
        both_views = loss_fn.needs_both_views  # get_data's loader (both views) serves a first epoch that needs them
        loader = (train.dataloader if run.fresh_loader and both_views
                  else train.train_loader(epoch, both_views=both_views))
        run.fresh_loader = False
        steps_before = run.plan.warmup_steps_before(epoch)
        losses = run_steps(model, loader, loss_fn, optimizer, scaler,
                           lambda i: run.plan.warmup_lr(steps_before + i), args, epoch, phase, run, tb_writer,
                           finish_images=train.views.on_device)
        report(args, tb_writer, {f"{phase}_epoch_loss": losses.get("loss", float("nan"))}, run.global_step)
    else:
        mixed_epoch(model, train, loss, epoch, optimizer, scaler, args, run, tb_writer)
    state.save(args, run, loss, epoch + 1)


def oracle_flags(result, flagged, epoch):
    """--safeclip-oracle-split (rank 0): the poisoned samples join the flagged ones, which the split ranks last
    (params.check_poison_metadata made sure before training that the data's metadata says which they are)."""
    poisoned = result.poisoned
    logging.info(f"SafeCLIP epoch {epoch}: --safeclip-oracle-split ranks the {int(poisoned.sum())} samples the "
                 f"metadata marks poisoned last (a bound, not a defense)")
    return poisoned if flagged is None else flagged | poisoned


def ranked_similarity(args, schedule, epoch, result, signal):
    """What the split's mixture ranks: the raw similarity, or from the second split on the relative one
    (--safeclip-rank-similarity relative). The first split stays on the raw similarity: its mixture
    decides how much of the data is clean (f0), a question about the pairs, not about the captions."""
    if args.safeclip_rank_similarity == "relative" and schedule.mixed_epoch(epoch) > 0:
        return signal["columns"]["relative_similarity"]
    return result.similarity


def mixed_epoch(model, train, loss, epoch, optimizer, scaler, args, run, tb_writer):
    """The split (from a similarity pass, or in fast mode from the last mixed epoch's training steps),
    its log and report, then the risky and the safe sub-epoch."""
    result, run.training_scores = run.training_scores, None
    if result is None:  # the first mixed epoch, faithful mode, or the first after a resume
        result = similarity_pass(model, train, args, epoch)
    first_pass = run.schedule.samples_seen is None
    signal = second_signal(args, result) if args.safeclip_score == "neighbours" else None
    split = None
    if args.rank == 0:
        flagged = None if signal is None else signal["flagged"]
        if args.safeclip_oracle_split:
            flagged = oracle_flags(result, flagged, epoch)
        split = run.schedule.split(epoch, ranked_similarity(args, run.schedule, epoch, result, signal), flagged)
        if split.fallback:
            logging.warning(f"SafeCLIP epoch {epoch}: the first split is blind: {split.fallback}; the safe set is "
                            f"the top --safeclip-safe-fraction-start {run.schedule.rule.fraction_start:g} by clean "
                            f"probability instead")
    safe = broadcast_mask(args, None if split is None else split.safe, result.num_samples)
    run.schedule.accept_split(epoch, safe)
    if first_pass and is_master(args):
        check_sample_count(args, train.num_samples, result.num_samples)
    columns = None if split is None else {**split.log_columns(), **(signal["columns"] if signal else {})}
    log_file = write_log(args, result, columns, safe, epoch)
    num_safe = int(safe.sum())
    num_risky = len(safe) - num_safe
    if is_master(args):
        poisoned = result.poisoned
        poison_note = ("" if poisoned is None else
                       f", poisoned in safe set {int((safe & poisoned).sum())} of {int(poisoned.sum())}")
        logging.info(f"SafeCLIP epoch {epoch}: {similarity_note(result)}; "
                     f"safe fraction {num_safe / max(1, len(safe)):.4f} (target {run.schedule.fraction:.4f}), "
                     f"safe {num_safe}, risky {num_risky}{poison_note}; log {log_file}")
        scalars = {"safe_fraction": num_safe / max(1, len(safe)), "safe_samples": num_safe,
                   "risky_samples": num_risky, f"similarity_{result.source}_seconds": result.seconds}
        detector = None if poisoned is None else detector_metrics(split.score, result.similarity, result.poison)
        if signal:
            logging.info(f"SafeCLIP epoch {epoch}: second signal {signal['seconds']:.1f}s against "
                         f"{signal['reference']} reference samples: flagged {int(signal['flagged'].sum())} "
                         f"({int(signal['columns']['copy'].sum())} copies of an image)"
                         f"{moved_note(split, result.similarity, poisoned)}")
            scalars.update(second_signal_seconds=signal["seconds"], flagged_samples=int(signal["flagged"].sum()))
        if detector:
            logging.info(f"SafeCLIP epoch {epoch}: {detector_line(detector)}")
            scalars.update({f"split_{name}_{field}": value for name, figures in detector.items() if figures
                            for field, value in figures.items() if field != "samples"})
        report(args, tb_writer, scalars, run.global_step)
    unlearn = None
    if args.safeclip_unlearn_fraction:
        suspect = None if split is None else suspect_mask(split, result.similarity, args.safeclip_unlearn_fraction)
        suspect = broadcast_mask(args, suspect, result.num_samples)
        unlearn = loss.unlearn.for_suspects(result.ids[suspect])
        if is_master(args):
            logging.info(f"SafeCLIP epoch {epoch}: unlearning {int(suspect.sum())} suspects on the risky side"
                         f"{suspect_note(result, suspect)}")
    keep_scores = args.safeclip_fast and epoch + 1 < args.epochs
    scores = TrainingScores(result, args.rank) if keep_scores else None
    lookup = SplitLookup(result.ids.copy() if keep_scores else result.ids, safe)  # takes over the array
    del result, safe, split
    for want_safe, tag, loss_fn in ((False, "risky", loss.inmodal), (True, "safe", loss.clip)):
        count = lookup.count(want_safe)
        if train.batches_for(count) == 0:
            if count and is_master(args):
                logging.info(f"SafeCLIP epoch {epoch}: the {tag} set ({count} samples) is smaller than one global "
                             f"batch ({args.batch_size * args.world_size}); its sub-epoch is skipped")
            continue
        loader = train.train_loader(epoch, lookup, want_safe, loss_fn.needs_both_views)
        steps_before = run.plan.sub_epoch_steps_before(epoch, tag)
        run_steps(model, loader, loss_fn, optimizer, scaler,
                  lambda i, tag=tag, before=steps_before: run.plan.sub_epoch_lr(tag, before + i),
                  args, epoch, tag, run, tb_writer, scores, train.views.on_device, None if want_safe else unlearn)
    if scores is not None:
        run.training_scores = scores.collect(args)


def suspect_mask(split, similarity, fraction):
    """Those of the lowest `fraction` by the split's score that are on the risky side: the samples most
    likely poisoned. Ties go to the lower similarity, as the split's own do (flagged samples whose clean
    probability is 0 tie at -2)."""
    suspect = top_fraction_mask(-split.score, fraction, tiebreak=-similarity)
    return suspect & ~split.safe


def suspect_note(result, suspect):
    """How many suspects the data's metadata marks poisoned, by kind (where it says)."""
    if result.poisoned is None:
        return ""
    kinds = [f"{kind} {int((suspect & (result.poison == code)).sum())}" for code, kind in enumerate(POISON_KINDS)
             if code and (result.poison == code).any()]
    return f", poisoned: {', '.join(kinds)}"


def similarity_note(result):
    if result.source == "pass":
        return f"similarity pass {result.seconds:.1f}s over {result.num_samples} samples"
    return (f"similarities from the last epoch's training steps (--safeclip-fast; {result.refreshed} of "
            f"{result.num_samples} refreshed, the rest kept; gathered in {result.seconds:.1f}s)")


def moved_note(split, similarity, poisoned):
    """How many clean samples the second signal moved out of the safe set the mixture alone would have
    chosen at the same size (where the data says which samples are clean)."""
    if poisoned is None:
        return ""
    moved = clean_moved_to_risky(split.clean_prob, similarity, split.safe, poisoned)
    return f"; it moved {moved} clean samples to the risky side"


def check_sample_count(args, counted, seen):
    """The learning-rate plan follows what the pass saw; say so when the count it started from was off."""
    if abs(counted - seen) > args.batch_size * args.world_size:
        logging.warning(f"SafeCLIP: the similarity pass saw {seen} samples, but the run was sized for {counted} "
                        f"(--train-num-samples or sizes.json); the mixed epochs' learning rates are sized from "
                        f"{seen}")
