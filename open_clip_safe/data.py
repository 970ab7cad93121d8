"""SafeCLIP's data: two augmented views per sample with a stable id, subset streams, the full pass.

Built from open_clip_train.data's blocks (shard lists, detshuffle2, split by node and worker, the
no-throw tar reader, DataInfo, CsvDataset's column conventions). A sample's id is its row index
for CSV and a 63-bit hash of its webdataset `__key__` otherwise, so the split lookup is one sorted
array of eight bytes a sample, no per-sample Python objects (docs/design.md#data-streams).

One rule sizes every stream, CSV and webdataset alike, and the learning-rate plan: `batches_for`.
"""
import hashlib
import random
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
import webdataset as wds
from open_clip_train.data import (DataInfo, ResampledShards2, SharedEpoch, detshuffle2,
                                  filter_no_caption_or_no_image, get_dataset_size, log_and_continue,
                                  tarfile_to_samples_nothrow, _SAMPLE_SHUFFLE_INITIAL, _SAMPLE_SHUFFLE_SIZE,
                                  _SHARD_SHUFFLE_INITIAL, _SHARD_SHUFFLE_SIZE)
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, get_worker_info

from open_clip_safe.attacks.build import BACKDOORS
from open_clip_safe.files import IMAGE_EXTENSIONS, shard_list
from open_clip_safe.params import dataset_kind

ID_MASK = (1 << 63) - 1
# What a sample's json (or a CSV's `attack` column) says, as the pass's int8 codes: -1 for nothing,
# else the index here.
POISON_KINDS = ("clean", "backdoor", "targeted", "other")


def sample_id(key):
    """Stable 63-bit id of a webdataset key (fits torch.int64)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & ID_MASK


class SplitLookup:
    """Safe/risky membership by sample id: one sorted uint64 array of (id << 1 | safe).

    Eight bytes a sample, built in place from the pass's id array, which it takes over (at
    LAION-400M an argsort and a second copy would cost every rank gigabytes more).
    """

    def __init__(self, ids, safe):
        packed = np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64)
        packed <<= np.uint64(1)
        packed |= np.asarray(safe, dtype=np.uint64)
        packed.sort()
        self.packed = packed
        self.num_safe = int(np.count_nonzero(packed & np.uint64(1)))
        self.num_risky = len(packed) - self.num_safe

    def is_safe(self, ids):
        shifted = np.asarray(ids, dtype=np.int64).view(np.uint64) << np.uint64(1)
        where = np.clip(np.searchsorted(self.packed, shifted), 0, len(self.packed) - 1)
        found = self.packed[where]
        return ((found >> np.uint64(1)) == (shifted >> np.uint64(1))) & (found & np.uint64(1)).astype(bool)

    def count(self, want_safe):
        return self.num_safe if want_safe else self.num_risky

    def select(self, want_safe):
        """Predicate on a raw webdataset sample: is it in the wanted subset?"""
        return InSubset(self, want_safe)

    def subset_indices(self, want_safe):
        """CSV: the row indices of the wanted subset (ids are row indices), in order."""
        members = (self.packed & np.uint64(1)) == np.uint64(want_safe)
        return (self.packed[members] >> np.uint64(1)).astype(np.int64)


class InSubset:
    """Picklable (for spawn-started workers) subset predicate on raw webdataset samples."""

    def __init__(self, lookup, want_safe):
        self.lookup, self.want_safe = lookup, want_safe

    def __call__(self, sample):
        return bool(self.lookup.is_safe([sample_id(sample["__key__"])])[0]) == self.want_safe


NO_VIEW = torch.empty(0)


class TwoViews:
    """Two augmented image views and two caption views of one sample.

    The caption views are drawn from an RNG seeded by (seed, key, view), so every epoch sees the
    same two augmented captions of a sample, as the authors' code does by augmenting once at load
    time, without holding them in memory.
    """

    def __init__(self, image_augment, caption_augment, tokenizer, seed, pass_image=None, on_device=None):
        self.image_augment = image_augment
        self.caption_augment = caption_augment
        self.tokenizer = tokenizer
        self.seed = seed
        self.pass_image = pass_image  # None: the pass sees view 1; else this transform and the raw caption
        self.on_device = on_device  # the views' batch half (photometric.Photometric) under --safeclip-augment-on device

    def finish_pass_images(self, images):
        """The pass's image batch, on the device, as the model embeds it (view 1 gets its batch half)."""
        return images if self.pass_image is not None or self.on_device is None else self.on_device(images)

    def caption(self, caption, key, view):
        if self.caption_augment is None:
            return caption
        return self.caption_augment(caption, random.Random(f"{self.seed}:{key}:{view}"))

    def tokens(self, caption, key, view):
        return self.tokenizer([self.caption(caption, key, view)])[0]

    def __call__(self, image, caption, key, both=True):
        """(image v1, image v2, caption v1, caption v2); with both=False, for a step that embeds view 1
        only, view 2 is an empty tensor (its augmentation and tokenizing cost nothing)."""
        if not both:
            return self.image_augment(image), NO_VIEW, self.tokens(caption, key, 1), NO_VIEW
        return (self.image_augment(image), self.image_augment(image),
                self.tokens(caption, key, 1), self.tokens(caption, key, 2))

    def train_tuple(self, sample, both=True):
        """(id, image v1, image v2, caption v1, caption v2) of a webdataset record."""
        return (sample_id(sample["key"]), *self(sample["image"], sample["text"], sample["key"], both))

    def pass_view(self, image, caption, key):
        """What the similarity pass embeds: view 1 (the authors) or the plain image and caption."""
        if self.pass_image is None:
            return self.image_augment(image), self.tokens(caption, key, 1)
        return self.pass_image(image), self.tokenizer([caption])[0]

    def pass_tuple(self, sample):
        """(id, key, poisoned flag, image, caption) of a webdataset record, as the pass embeds them."""
        key = sample["key"]
        image, tokens = self.pass_view(sample["image"], sample["text"], key)
        return sample_id(key), key, poison_code(sample.get("meta")), image, tokens


def poison_code(meta):
    """-1 where the sample's json says nothing of poisoning, else its POISON_KINDS index."""
    if not meta or "poisoned" not in meta:
        return -1
    if not meta["poisoned"]:
        return 0
    attack = meta.get("attack")
    kind = "backdoor" if attack in BACKDOORS else attack if attack in POISON_KINDS else "other"
    return POISON_KINDS.index(kind)


# ---------------------------------------------------------------- webdataset


class SeededShuffle(wds.PipelineStage):
    """wds.shuffle with an RNG from (seed, epoch, rank, worker): open_clip's is seeded by pid + time."""

    def __init__(self, seed, epoch):
        self.seed, self.epoch = seed, epoch

    def run(self, src):
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}:{self.epoch.get_value()}:{rank}:{worker}")
        return wds.filters._shuffle(src, _SAMPLE_SHUFFLE_SIZE, _SAMPLE_SHUFFLE_INITIAL, rng)


def record(sample):
    """A decoded webdataset sample as image, caption, key and its json metadata (None if absent)."""
    image = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
    return {"image": image, "text": sample["txt"], "key": sample["__key__"], "meta": sample.get("json")}


def selected(select=None):
    """Pipeline stages that drop raw tar samples: those without a caption or image, those not in `select`."""
    return [wds.select(filter_no_caption_or_no_image)] + ([] if select is None else [wds.select(select)])


def decoded():
    """Pipeline stages from raw tar samples to records."""
    return [wds.decode("pilrgb", handler=log_and_continue), wds.map(record)]


def pass_after_pass(samples):
    """`samples` over and over, so that a batch may span two passes: a worker whose shards hold a few
    samples fewer than its share of a subset fills its batches instead of stopping short (which DDP,
    waiting for every rank's step, would not survive). Samples repeat inside a batch only where a
    worker's shards hold fewer than one batch of the subset."""
    while True:
        empty = True
        for sample in samples:
            empty = False
            yield sample
        if empty:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            raise RuntimeError(f"data-loader worker {worker} of rank {rank} found no sample of this subset in its "
                               f"shards; use fewer --workers, or more and smaller shards")


def pin_memory(args):
    """Page-locked batches where they go to a CUDA device: the copy then runs beside the step."""
    return str(getattr(args, "device", "cpu")).startswith("cuda")


def batches_for(count, args):
    """Steps of a stream over `count` samples: whole global batches, CSV and webdataset alike. A
    subset smaller than one global batch gets none (its sub-epoch is skipped, and logged): padding it
    out would repeat samples inside a contrastive batch, where each repeat is a false negative."""
    return count // (args.batch_size * args.world_size)


def worker_shares(batches, workers):
    """Batches per data-loader worker: as even as can be, on at most `batches` workers."""
    used = max(1, min(workers, batches))
    return [batches // used + (worker < batches % used) for worker in range(used)]


class WorkerShare(wds.PipelineStage):
    """The first shares[worker] items of each worker's stream (webdataset's with_epoch, per worker)."""

    def __init__(self, shares):
        self.shares = shares

    def run(self, src):
        _, _, worker, _ = wds.utils.pytorch_worker_info()
        for count, item in enumerate(src):
            if count == self.shares[worker]:
                return
            yield item


def wds_train_loader(args, views, shared_epoch, num_samples, select=None, both_views=True):
    """batches_for(num_samples) full batches of (id, v1, v2, t1, t2) per rank, spread over the workers."""
    shares = worker_shares(batches_for(num_samples, args), max(1, args.workers))
    if args.dataset_resampled:
        shards = [ResampledShards2(args.train_data, deterministic=True, epoch=shared_epoch)]
    else:
        shards = [wds.SimpleShardList(args.train_data),
                  detshuffle2(bufsize=_SHARD_SHUFFLE_SIZE, initial=_SHARD_SHUFFLE_INITIAL, seed=args.seed,
                              epoch=shared_epoch),
                  wds.split_by_node, wds.split_by_worker]
    # shuffled before decoding (as open_clip does): the buffer fills with raw bytes, so the first
    # batch does not wait for a buffer of decoded images, and skipped samples cost no decode
    samples = wds.DataPipeline(*shards, tarfile_to_samples_nothrow, *selected(select),
                               SeededShuffle(args.seed, shared_epoch), *decoded(),
                               wds.map(partial(views.train_tuple, both=both_views)))
    pipeline = wds.DataPipeline(partial(pass_after_pass, samples), wds.batched(args.batch_size, partial=False),
                                WorkerShare(shares))
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=len(shares) if args.workers else 0,
                           persistent_workers=False, pin_memory=pin_memory(args))
    loader.num_batches = sum(shares) if batches_for(num_samples, args) else 0
    loader.num_samples = loader.num_batches * args.batch_size * args.world_size
    return loader


def wds_pass_loader(args, views, batch_size):
    """Every sample exactly once across ranks and workers: (ids, keys, poisoned, v1, t1) batches."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(args.train_data), wds.split_by_node, wds.split_by_worker,
        tarfile_to_samples_nothrow, *selected(), *decoded(), wds.map(views.pass_tuple),
        wds.batched(batch_size, partial=True))
    workers = min(args.workers, max(1, len(shard_list(args.train_data)) // args.world_size))
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory(args))


def wds_num_samples(args):
    if args.train_num_samples is not None:
        return args.train_num_samples
    return get_dataset_size(args.train_data)[0]


# ---------------------------------------------------------------- CSV


class CsvSamples(Dataset):
    """Rows of an open_clip CSV as (row id, image, caption, key, poison code).

    Poison codes come from the `poisoned` and `attack` columns open_clip_safe.attacks writes."""

    def __init__(self, args):
        table = pd.read_csv(args.train_data, sep=args.csv_separator)
        self.images = table[args.csv_img_key].astype(str).tolist()
        self.captions = table[args.csv_caption_key].astype(str).tolist()
        self.poison = np.full(len(table), -1, dtype=np.int8)
        if "poisoned" in table.columns:
            flags = table["poisoned"]
            names = table["attack"] if "attack" in table.columns else pd.Series(None, index=table.index, dtype=object)
            kinds = names.map(lambda name: poison_code({"poisoned": True, "attack": name})).to_numpy()
            self.poison = np.where(flags.isna(), -1, np.where(flags.fillna(0).astype(bool), kinds, 0)).astype(np.int8)

    def __len__(self):
        return len(self.captions)

    def load(self, index):
        return Image.open(self.images[index]).convert("RGB"), self.captions[index], str(index)


class CsvRows(Dataset):
    """CSV rows as training tuples (both views) or, with `pass_view`, similarity-pass tuples (view 1)."""

    def __init__(self, samples, views, pass_view=False, both_views=True):
        self.samples, self.views, self.pass_view, self.both_views = samples, views, pass_view, both_views

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image, caption, key = self.samples.load(index)
        if self.pass_view:
            return (index, key, int(self.samples.poison[index]), *self.views.pass_view(image, caption, key))
        return (index, *self.views(image, caption, key, self.both_views))


def seed_worker(worker_id):
    """numpy / random in CSV workers follow torch's per-worker seed (torchvision uses torch's)."""
    seed = get_worker_info().seed % 2**32
    np.random.seed(seed)
    random.seed(seed)


def csv_train_loader(args, dataset, epoch, indices=None):
    subset = dataset if indices is None else Subset(dataset, indices)
    sampler = (DistributedSampler(subset, num_replicas=args.world_size, rank=args.rank, shuffle=True,
                                  seed=args.seed, drop_last=True) if args.distributed else None)
    if sampler is not None:
        sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    loader = DataLoader(subset, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, drop_last=True, worker_init_fn=seed_worker,
                        generator=generator, pin_memory=pin_memory(args))
    loader.num_batches = len(loader)
    loader.num_samples = loader.num_batches * args.batch_size * args.world_size
    return loader


def csv_pass_loader(args, dataset, batch_size):
    """Rows rank, rank + world, ...: each row once, no padding (DistributedSampler would pad)."""
    rows = list(range(args.rank, len(dataset), args.world_size))
    return DataLoader(Subset(dataset, rows), batch_size=batch_size, shuffle=False, num_workers=args.workers,
                      collate_fn=collate_pass, pin_memory=pin_memory(args))


def collate_pass(batch):
    ids, keys, poisoned, images, tokens = zip(*batch)
    return (torch.tensor(ids), list(keys), torch.tensor(poisoned), torch.stack(images), torch.stack(tokens))


# ---------------------------------------------------------------- the train DataInfo


@dataclass
class SafeclipData(DataInfo):
    """open_clip's DataInfo for the full stream, plus SafeCLIP's subset streams and similarity pass.

    `dataloader` is the all-samples loader open_clip's main sizes its (unused) scheduler from.
    """

    args: object = None
    views: TwoViews = None
    kind: str = "webdataset"
    csv: CsvSamples = None
    num_samples: int = 0
    run: object = None  # SafeCLIP's schedule state (open_clip_safe.safeclip.SafeclipRun)

    def train_loader(self, epoch, lookup=None, want_safe=None, both_views=True):
        """A loader over all samples, or over the safe / risky subset of `lookup`; with both_views=False
        its batches carry view 1 only (TwoViews)."""
        self.set_epoch(epoch)
        if self.kind == "csv":
            indices = None if lookup is None else lookup.subset_indices(want_safe)
            return csv_train_loader(self.args, CsvRows(self.csv, self.views, both_views=both_views), epoch, indices)
        count = self.num_samples if lookup is None else lookup.count(want_safe)
        select = None if lookup is None else lookup.select(want_safe)
        return wds_train_loader(self.args, self.views, self.shared_epoch, count, select, both_views)

    def pass_loader(self, batch_size):
        if self.kind == "csv":
            return csv_pass_loader(self.args, CsvRows(self.csv, self.views, pass_view=True), batch_size)
        return wds_pass_loader(self.args, self.views, batch_size)

    def batches_for(self, count):
        return batches_for(count, self.args)


def get_safeclip_data(args, image_augment, caption_augment, tokenizer, epoch=0, pass_image=None, on_device=None):
    views = TwoViews(image_augment, caption_augment, tokenizer, args.seed, pass_image, on_device)
    kind = dataset_kind(args.train_data, args.dataset_type)
    data = SafeclipData(dataloader=None, shared_epoch=SharedEpoch(epoch), args=args, views=views, kind=kind)
    if kind == "csv":
        data.csv = CsvSamples(args)
        data.num_samples = len(data.csv)
    else:
        data.num_samples = wds_num_samples(args)
    data.dataloader = data.train_loader(epoch)
    return data

