"""SafeCLIP's train_one_epoch, built on open_clip_train's helpers.

open_clip's own loop unpacks `images, texts = batch` and hands its loss only features, so SafeCLIP
needs its own: one DDP forward per step on both views concatenated, the unimodal or the CLIP loss,
and, in mixed epochs, the similarity pass, the split and the risky and safe sub-epochs.
"""
import logging
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from open_clip_train.distributed import is_master
from open_clip import get_input_dtype
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import assign_learning_rate
from open_clip_train.train import AverageMeter, backward, unwrap_model

from open_clip_safe.data import SplitLookup
from open_clip_safe.similarity import similarity_pass, write_log

try:
    import wandb
except ImportError:
    wandb = None


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
    """Scalars to tensorboard / wandb under train/, as open_clip names them."""
    values = {f"train/{name}": value for name, value in values.items()}
    if tb_writer is not None:
        for name, value in values.items():
            tb_writer.add_scalar(name, value, step)
    if args.wandb and wandb is not None:
        wandb.log({**values, "step": step}, step=step)


def run_steps(model, loader, loss_fn, optimizer, scaler, lr_at, args, epoch, tag, run, tb_writer):
    """Train on every batch of `loader` with `loss_fn`; `lr_at(i)` gives the i-th step's learning rate."""
    device = torch.device(args.device)
    autocast = get_autocast(args.precision, device_type=device.type)
    input_dtype = get_input_dtype(args.precision)
    both_views = loss_fn.needs_both_views
    model.train()
    meters = {}
    batch_time, data_time = AverageMeter(), AverageMeter()
    num_batches = loader.num_batches
    end = time.time()
    for i, (_, image_v1, image_v2, text_v1, text_v2) in enumerate(loader):
        lr = lr_at(i)
        assign_learning_rate(optimizer, lr)
        images = torch.cat([image_v1, image_v2]) if both_views else image_v1
        texts = torch.cat([text_v1, text_v2]) if both_views else text_v1
        images = images.to(device=device, dtype=input_dtype, non_blocking=True)
        texts = texts.to(device=device, non_blocking=True)
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


def broadcast_split(args, mask, clean_prob, count):
    """Rank 0's split to every rank (the mixture fit runs once, on rank 0)."""
    if not args.distributed:
        return mask, clean_prob
    mask_t = torch.zeros(count, dtype=torch.uint8)
    prob_t = torch.zeros(count, dtype=torch.float32)
    if args.rank == 0:
        mask_t[:] = torch.from_numpy(mask.astype(np.uint8))
        prob_t[:] = torch.from_numpy(clean_prob.astype(np.float32))
    dist.broadcast(mask_t, 0)
    dist.broadcast(prob_t, 0)
    return mask_t.numpy().astype(bool), prob_t.numpy()


def state_file(args, epoch):
    """Beside checkpoints/, not in it: open_clip's --resume latest takes the newest *.pt found there."""
    return os.path.join(os.path.dirname(args.checkpoint_path), "safeclip_state", f"epoch_{epoch}.pt")


def save_state(args, run, loss, epoch):
    """SafeCLIP's state after `epoch` epochs, beside open_clip's checkpoints, for --resume."""
    if not args.save_logs:
        return
    os.makedirs(os.path.dirname(state_file(args, epoch)), exist_ok=True)
    torch.save({"schedule": run.schedule.state_dict(), "global_step": run.global_step,
                "loss": loss.state_dict()}, state_file(args, epoch))
    previous = state_file(args, epoch - 1)
    if args.delete_previous_checkpoint and os.path.exists(previous):
        os.remove(previous)


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
    """One SafeCLIP epoch: warm-up epochs train on all samples, mixed epochs split them first.

    open_clip's scheduler is not used: SafeCLIP's learning-rate plan has one schedule per phase.
    """
    train = data["train"]
    run = train.run
    if run.pending_loss_state is not None:
        loss.load_state_dict(run.pending_loss_state)
        run.pending_loss_state = None
    seed_epoch(args, epoch)
    phase = run.schedule.phase(epoch)
    if is_master(args):
        logging.info(f"SafeCLIP epoch {epoch}: {phase} phase")
    if phase != "mixed":
        loader = train.dataloader if run.fresh_loader else train.train_loader(epoch)
        run.fresh_loader = False
        loss_fn = loss.inmodal if phase == "inmodal" else loss.clip
        steps_before = run.plan.warmup_steps_before(epoch)
        losses = run_steps(model, loader, loss_fn, optimizer, scaler,
                           lambda i: run.plan.warmup_lr(steps_before + i), args, epoch, phase, run, tb_writer)
        report(args, tb_writer, {f"{phase}_epoch_loss": losses.get("loss", float("nan"))}, run.global_step)
    else:
        mixed_epoch(model, train, loss, epoch, optimizer, scaler, args, run, tb_writer)
    save_state(args, run, loss, epoch + 1)


def mixed_epoch(model, train, loss, epoch, optimizer, scaler, args, run, tb_writer):
    result = similarity_pass(model, train, args, epoch)
    if args.rank == 0:
        safe, clean_prob = run.schedule.split(epoch, result.similarity)
    else:
        safe = clean_prob = None
    safe, clean_prob = broadcast_split(args, safe, clean_prob, len(result.similarity))
    run.schedule.accept_split(epoch, safe)
    log_file = write_log(args, result, clean_prob, safe, epoch)
    num_safe = int(safe.sum())
    num_risky = len(safe) - num_safe
    if is_master(args):
        poisoned = result.poisoned == 1
        poison_note = (f", poisoned in safe set {int((safe & poisoned).sum())} of {int(poisoned.sum())}"
                       if poisoned.any() else "")
        logging.info(f"SafeCLIP epoch {epoch}: similarity pass {result.seconds:.1f}s over {len(safe)} samples; "
                     f"safe fraction {num_safe / max(1, len(safe)):.4f} (target {run.schedule.fraction:.4f}), "
                     f"safe {num_safe}, risky {num_risky}{poison_note}; log {log_file}")
        report(args, tb_writer, {"safe_fraction": num_safe / max(1, len(safe)), "safe_samples": num_safe,
                                 "risky_samples": num_risky, "similarity_pass_seconds": result.seconds},
               run.global_step)
    lookup = SplitLookup(result.ids, safe)
    for want_safe, tag, loss_fn in ((False, "risky", loss.inmodal), (True, "safe", loss.clip)):
        count = num_safe if want_safe else num_risky
        if train.subset_batches(count) == 0 or count == 0:
            continue
        loader = train.train_loader(epoch, lookup, want_safe)
        steps_before = run.plan.sub_epoch_steps_before(epoch, tag)
        run_steps(model, loader, loss_fn, optimizer, scaler,
                  lambda i, tag=tag, before=steps_before: run.plan.sub_epoch_lr(tag, before + i),
                  args, epoch, tag, run, tb_writer)
