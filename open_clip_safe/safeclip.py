"""The seams SafeCLIP puts into open_clip_train.main; each defers to open_clip without --safeclip."""
import logging

from open_clip import create_loss as open_clip_create_loss
from open_clip_train.data import get_data as open_clip_get_data
from open_clip_train.distributed import is_master
from open_clip_train.train import train_one_epoch as open_clip_train_one_epoch

from open_clip_safe import augment, collectives, data as safeclip_data, params, state, train as safeclip_train
from open_clip_safe.loss import SafeclipLosses
from open_clip_safe.schedule import SafeclipSchedule


class SafeclipRun:
    """What SafeCLIP carries from epoch to epoch besides the model: the schedule and the step count."""

    def __init__(self, args, data):
        self.schedule = SafeclipSchedule.from_args(args, data)
        if is_master(args) and (args.safeclip_filter_lr is None or args.safeclip_crossmodal_warmup is None):
            plan = self.schedule.plan
            logging.info(f"SafeCLIP cross-modal warm-up of {plan.crossmodal_epochs * plan.steps_per_epoch} steps: "
                         f"--safeclip-filter-lr {plan.filter_lr:.3g}, --safeclip-crossmodal-warmup "
                         f"{plan.crossmodal_warmup} (auto, from the step count)")
        self.global_step = 0
        self.fresh_loader = True  # the loader get_data built serves the first epoch
        self.pending_loss_state = None
        self.training_scores = None  # fast mode: the next split's similarities (a PassResult), from the last epoch

    @property
    def plan(self):
        return self.schedule.plan


def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
    if not args.safeclip:
        return open_clip_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    collectives.start_host_group(args)
    if is_master(args) and getattr(args, "safeclip_preset_note", None):
        logging.info(args.safeclip_preset_note)
    train_data, args.train_data = args.train_data, None
    try:
        data = open_clip_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)  # val / imagenet
    finally:
        args.train_data = train_data
    on_device = None
    if args.safeclip_image_aug == "open_clip":
        image_augment = preprocess_fns[0]
    else:
        image_augment, on_device = augment.image_views_like(
            preprocess_fns[0], args.safeclip_crop_scale, params.augment_on_device(args), args.safeclip_color_jitter,
            args.safeclip_blur_sigma)
    caption_augment = augment.EdaAugmenter() if args.safeclip_text_aug == "eda" else None
    if is_master(args):
        if args.aug_cfg and args.safeclip_image_aug == "safeclip":
            logging.warning("--aug-cfg does not change SafeCLIP's image views (the authors' augmentation); "
                            "add --safeclip-image-aug open_clip to train on open_clip's")
        where = "" if on_device is None else f", then on {args.device} for each batch: {on_device}"
        logging.info(f"SafeCLIP image views ({args.safeclip_image_aug}): {image_augment}{where}; "
                     f"caption views: {args.safeclip_text_aug}; similarity pass on {args.safeclip_sim_views} views")
    pass_image = preprocess_fns[1] if args.safeclip_sim_views == "plain" else None
    train = safeclip_data.get_safeclip_data(args, image_augment, caption_augment, tokenizer, epoch, pass_image,
                                            on_device)
    train.run = SafeclipRun(args, train)
    safeclip_train.log_on_the_run_step(train.run)
    if epoch > 0:
        state.load(args, train.run, epoch)
    elif is_master(args):
        logging.info(f"SafeCLIP learning-rate plan:\n{train.run.plan.summary()}")
        warn_if_the_clip_loss_starves(args, train.run.schedule)
    data["train"] = train
    return data


def warn_if_the_clip_loss_starves(args, schedule):
    """At the start of a run: say so when the plan gives the CLIP loss under half the samples plain CLIP
    would see in as many epochs (under gmm, taking --safeclip-safe-fraction-start as the first split's share)."""
    share = schedule.clip_loss_share(first_fraction=args.safeclip_safe_fraction_start)
    if share < 0.5:
        logging.warning(
            f"SafeCLIP: this plan gives the CLIP loss about {share:.0%} of the samples plain CLIP would see in "
            f"{args.epochs} epochs ({schedule.crossmodal_epochs} cross-modal epochs plus the safe fractions of "
            f"{schedule.mixed_epochs} mixed epochs, from a first safe fraction of about "
            f"{args.safeclip_safe_fraction_start:g}); more --epochs, a larger --safeclip-safe-fraction-step (or auto), "
            f"--safeclip-safe-fraction-max, or fewer --safeclip-inmodal-epochs give it more")


def create_loss(args):
    if not args.safeclip:
        return open_clip_create_loss(args)
    return SafeclipLosses(args)


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
    if not args.safeclip:
        return open_clip_train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                                         tb_writer=tb_writer)
    return safeclip_train.train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model,
                                          args, tb_writer=tb_writer)
