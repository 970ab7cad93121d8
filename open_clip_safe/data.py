"""SafeCLIP's data: two augmented views per sample with a stable id, subset streams, the full pass.

Built from open_clip_train.data's blocks (shard lists, detshuffle2, split by node and worker, the
no-throw tar reader, DataInfo, CsvDataset's column conventions). A sample's id is its row index
for CSV and a 63-bit hash of its webdataset `__key__` otherwise, so the split lookup is a sorted
int64 array and a bool array: nine bytes a sample, no per-sample Python objects.
"""
import hashlib
import math
import random
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
import webdataset as wds
from open_clip_train.data import (DataInfo, ResampledShards2, SharedEpoch, detshuffle2, expand_urls,
                                  filter_no_caption_or_no_image, get_dataset_size, log_and_continue,
                                  tarfile_to_samples_nothrow, _SAMPLE_SHUFFLE_INITIAL, _SAMPLE_SHUFFLE_SIZE,
                                  _SHARD_SHUFFLE_INITIAL, _SHARD_SHUFFLE_SIZE)
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, get_worker_info

from open_clip_safe.params import dataset_kind

ID_MASK = (1 << 63) - 1


def sample_id(key):
    """Stable 63-bit id of a webdataset key (fits torch.int64)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & ID_MASK


class SplitLookup:
    """Safe/risky membership by sample id: a sorted id array and a parallel bool array."""

    def __init__(self, ids, safe):
        order = np.argsort(ids, kind="stable")
        self.ids = np.ascontiguousarray(ids[order], dtype=np.int64)
        self.safe = np.ascontiguousarray(safe[order], dtype=bool)

    def is_safe(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        where = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
        return (self.ids[where] == ids) & self.safe[where]

    def select(self, want_safe):
        """Predicate on a raw webdataset sample: is it in the wanted subset?"""
        return InSubset(self, want_safe)

    def subset_indices(self, want_safe):
        """CSV: the row indices of the wanted subset (ids are row indices)."""
        return np.sort(self.ids[self.safe == want_safe])


class InSubset:
    """Picklable (for spawn-started workers) subset predicate on raw webdataset samples."""

    def __init__(self, lookup, want_safe):
        self.lookup, self.want_safe = lookup, want_safe

    def __call__(self, sample):
        return bool(self.lookup.is_safe([sample_id(sample["__key__"])])[0]) == self.want_safe


class TwoViews:
    """Two augmented image views and two caption views of one sample.

    The caption views are drawn from an RNG seeded by (seed, key, view), so every epoch sees the
    same two augmented captions of a sample, as the authors' code does by augmenting once at load
    time, without holding them in memory.
    """

    def __init__(self, image_augment, caption_augment, tokenizer, seed, pass_image=None):
        self.image_augment = image_augment
        self.caption_augment = caption_augment
        self.tokenizer = tokenizer
        self.seed = seed
        self.pass_image = pass_image  # None: the pass sees view 1; else this transform and the raw caption

    def caption(self, caption, key, view):
        if self.caption_augment is None:
            return caption
        return self.caption_augment(caption, random.Random(f"{self.seed}:{key}:{view}"))

    def tokens(self, caption, key, view):
        return self.tokenizer([self.caption(caption, key, view)])[0]

    def __call__(self, image, caption, key):
        return (self.image_augment(image), self.image_augment(image),
                self.tokens(caption, key, 1), self.tokens(caption, key, 2))

    def train_tuple(self, sample):
        """(id, image v1, image v2, caption v1, caption v2) of a webdataset record."""
        return (sample_id(sample["key"]), *self(sample["image"], sample["text"], sample["key"]))

    def pass_view(self, image, caption, key):
        """What the similarity pass embeds: view 1 (the authors) or the plain image and caption."""
        if self.pass_image is None:
            return self.image_augment(image), self.tokens(caption, key, 1)
        return self.pass_image(image), self.tokenizer([caption])[0]

    def pass_tuple(self, sample):
        """(id, key, poisoned flag, image, caption) of a webdataset record, as the pass embeds them."""
        key = sample["key"]
        image, tokens = self.pass_view(sample["image"], sample["text"], key)
        return sample_id(key), key, poisoned_flag(sample.get("meta")), image, tokens


def poisoned_flag(meta):
    """1 / 0 where the sample's json says poisoned or clean, -1 where it says nothing."""
    if not meta or "poisoned" not in meta:
        return -1
    return int(bool(meta["poisoned"]))


# ---------------------------------------------------------------- webdataset


class SeededShuffle(wds.PipelineStage):
    """wds.shuffle with an RNG from (seed, epoch, rank, worker): open_clip's is seeded by pid + time."""

    def __init__(self, seed, epoch):
        self.seed, self.epoch = seed, epoch

    def run(self, src):
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}:{self.epoch.get_value()}:{rank}:{worker}")
        return wds.filters._shuffle(src, _SAMPLE_SHUFFLE_SIZE, _SAMPLE_SHUFFLE_INITIAL, rng)


IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")


def record(sample):
    """A decoded webdataset sample as image, caption, key and its json metadata (None if absent)."""
    image = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
    return {"image": image, "text": sample["txt"], "key": sample["__key__"], "meta": sample.get("json")}


def decoded(select=None):
    """Pipeline stages from raw tar samples to records."""
    stages = [wds.select(filter_no_caption_or_no_image)]
    if select is not None:
        stages.append(wds.select(select))  # before decoding: skipped samples cost no image decode
    return stages + [wds.decode("pilrgb", handler=log_and_continue), wds.map(record)]


def pass_after_pass(samples):
    """`samples` over and over, so that a batch may span two passes: a subset thinner than a batch in
    one worker's shards (a small first safe set) still fills its batches instead of looping forever."""
    while True:
        empty = True
        for sample in samples:
            empty = False
            yield sample
        if empty:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            raise RuntimeError(f"data-loader worker {worker} of rank {rank} found no sample of this subset in its "
                               f"shards; use fewer --workers, or more and smaller shards")


def wds_train_loader(args, views, shared_epoch, num_samples, select=None):
    """Full batches of (id, v1, v2, t1, t2), the same number on every worker of every rank."""
    global_batch = args.batch_size * args.world_size
    workers = max(1, args.workers)
    worker_batches = max(1, math.floor(num_samples / global_batch / workers))
    if args.dataset_resampled:
        shards = [ResampledShards2(args.train_data, deterministic=True, epoch=shared_epoch)]
    else:
        shards = [wds.SimpleShardList(args.train_data),
                  detshuffle2(bufsize=_SHARD_SHUFFLE_SIZE, initial=_SHARD_SHUFFLE_INITIAL, seed=args.seed,
                              epoch=shared_epoch),
                  wds.split_by_node, wds.split_by_worker]
    samples = wds.DataPipeline(*shards, tarfile_to_samples_nothrow, *decoded(select),
                               SeededShuffle(args.seed, shared_epoch), wds.map(views.train_tuple))
    pipeline = wds.DataPipeline(partial(pass_after_pass, samples), wds.batched(args.batch_size, partial=False)
                                ).with_epoch(worker_batches)
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=args.workers,
                           persistent_workers=False)
    loader.num_batches = worker_batches * workers
    loader.num_samples = loader.num_batches * global_batch
    return loader


def wds_pass_loader(args, views, batch_size):
    """Every sample exactly once across ranks and workers: (ids, keys, poisoned, v1, t1) batches."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(args.train_data), wds.split_by_node, wds.split_by_worker,
        tarfile_to_samples_nothrow, *decoded(), wds.map(views.pass_tuple), wds.batched(batch_size, partial=True))
    workers = min(args.workers, max(1, len(expand_urls(args.train_data)[0]) // args.world_size))
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers)


def wds_num_samples(args):
    if args.train_num_samples is not None:
        return args.train_num_samples
    return get_dataset_size(args.train_data)[0]


# ---------------------------------------------------------------- CSV


class CsvSamples(Dataset):
    """Rows of an open_clip CSV as (row id, image, caption, key, poisoned flag)."""

    def __init__(self, args):
        table = pd.read_csv(args.train_data, sep=args.csv_separator)
        self.images = table[args.csv_img_key].astype(str).tolist()
        self.captions = table[args.csv_caption_key].astype(str).tolist()
        self.poisoned = (table["poisoned"].fillna(-1).astype(int).to_numpy() if "poisoned" in table.columns
                         else np.full(len(table), -1, dtype=np.int64))

    def __len__(self):
        return len(self.captions)

    def load(self, index):
        return Image.open(self.images[index]).convert("RGB"), self.captions[index], str(index)


class CsvRows(Dataset):
    """CSV rows as training tuples (both views) or, with `pass_view`, similarity-pass tuples (view 1)."""

    def __init__(self, samples, views, pass_view=False):
        self.samples, self.views, self.pass_view = samples, views, pass_view

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image, caption, key = self.samples.load(index)
        if self.pass_view:
            return (index, key, int(self.samples.poisoned[index]), *self.views.pass_view(image, caption, key))
        return (index, *self.views(image, caption, key))


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
                        generator=generator)
    loader.num_batches = len(loader)
    loader.num_samples = loader.num_batches * args.batch_size * args.world_size
    return loader


def csv_pass_loader(args, dataset, batch_size):
    """Rows rank, rank + world, ...: each row once, no padding (DistributedSampler would pad)."""
    rows = list(range(args.rank, len(dataset), args.world_size))
    return DataLoader(Subset(dataset, rows), batch_size=batch_size, shuffle=False, num_workers=args.workers,
                      collate_fn=collate_pass)


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

    def train_loader(self, epoch, lookup=None, want_safe=None):
        """A loader over all samples, or over the safe / risky subset of `lookup`."""
        self.set_epoch(epoch)
        if self.kind == "csv":
            indices = None if lookup is None else lookup.subset_indices(want_safe)
            return csv_train_loader(self.args, CsvRows(self.csv, self.views), epoch, indices)
        count = self.num_samples
        select = None
        if lookup is not None:
            count = int(lookup.safe.sum() if want_safe else (~lookup.safe).sum())
            select = lookup.select(want_safe)
        return wds_train_loader(self.args, self.views, self.shared_epoch, count, select)

    def pass_loader(self, batch_size):
        if self.kind == "csv":
            return csv_pass_loader(self.args, CsvRows(self.csv, self.views, pass_view=True), batch_size)
        return wds_pass_loader(self.args, self.views, batch_size)

    def subset_batches(self, count):
        """Full global batches a subset of `count` samples yields (for the learning-rate plan)."""
        global_batch = self.args.batch_size * self.args.world_size
        if self.kind == "csv":
            return count // global_batch
        workers = max(1, self.args.workers)
        return max(1, math.floor(count / global_batch / workers)) * workers


def get_safeclip_data(args, image_augment, caption_augment, tokenizer, epoch=0, pass_image=None):
    views = TwoViews(image_augment, caption_augment, tokenizer, args.seed, pass_image)
    kind = dataset_kind(args.train_data, args.dataset_type)
    data = SafeclipData(dataloader=None, shared_epoch=SharedEpoch(epoch), args=args, views=views, kind=kind)
    if kind == "csv":
        data.csv = CsvSamples(args)
        data.num_samples = len(data.csv)
    else:
        data.num_samples = wds_num_samples(args)
    data.dataloader = data.train_loader(epoch)
    return data

