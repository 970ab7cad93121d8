"""The per-sample similarity pass before each mixed epoch, and its Parquet log.

Every training sample is embedded exactly once across all ranks (no padding: padded duplicates
would enter the mixture fit), in eval mode without gradients, through the unwrapped model so that
ranks with different sample counts never meet in a DDP collective. Ids and similarities are then
gathered to every rank; each rank writes its own rows of the log, and rank 0 merges the parts into
one file per epoch.
"""
import logging
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip_train.distributed import is_master
from open_clip import get_input_dtype
from open_clip_train.precision import get_autocast
from open_clip_train.train import unwrap_model
from tqdm import tqdm


@dataclass
class PassResult:
    """Gathered arrays in rank-major order; this rank's rows are [offset, offset + len(keys))."""

    ids: np.ndarray
    similarity: np.ndarray
    poisoned: np.ndarray
    keys: list
    offset: int
    seconds: float

    @property
    def local(self):
        return slice(self.offset, self.offset + len(self.keys))


def gather_rows(args, *arrays):
    """All-gather 1-D tensors of different lengths per rank; returns numpy arrays and this rank's offset."""
    if not args.distributed:
        return [a.cpu().numpy() for a in arrays], 0
    count = torch.tensor([len(arrays[0])], dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(args.world_size)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    longest = max(counts)
    gathered = []
    for array in arrays:
        padded = torch.zeros(longest, dtype=array.dtype)
        padded[:len(array)] = array
        parts = [torch.zeros_like(padded) for _ in range(args.world_size)]
        dist.all_gather(parts, padded)
        gathered.append(np.concatenate([p[:n].numpy() for p, n in zip(parts, counts)]))
    return gathered, sum(counts[:args.rank])


@torch.no_grad()
def similarity_pass(model, data, args, epoch):
    """Cosine similarity of each sample's image view 1 with its caption view 1, for all samples."""
    start = time.time()
    device = torch.device(args.device)
    autocast = get_autocast(args.precision, device_type=device.type)
    input_dtype = get_input_dtype(args.precision)
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    batch_size = args.safeclip_sim_batch_size or 2 * args.batch_size
    ids, sims, poisoned, keys = [], [], [], []
    expected = -(-data.num_samples // (batch_size * args.world_size))
    progress = tqdm(data.pass_loader(batch_size), total=expected, desc=f"similarity pass (epoch {epoch})",
                    unit="batch", disable=not is_master(args))
    for batch_ids, batch_keys, batch_poisoned, images, texts in progress:
        images = images.to(device=device, dtype=input_dtype, non_blocking=True)
        texts = texts.to(device=device, non_blocking=True)
        with autocast():
            image_features = model.encode_image(images, normalize=True)
            text_features = model.encode_text(texts, normalize=True)
        sims.append(F.cosine_similarity(image_features.float(), text_features.float()).cpu())
        ids.append(torch.as_tensor(batch_ids, dtype=torch.int64))
        poisoned.append(torch.as_tensor(batch_poisoned, dtype=torch.int64))
        keys.extend(batch_keys)
    model.train(was_training)

    def cat(parts, dtype):
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

    (all_ids, all_sims, all_poisoned), offset = gather_rows(
        args, cat(ids, torch.int64), cat(sims, torch.float32), cat(poisoned, torch.int64))
    duplicates = len(all_ids) - len(np.unique(all_ids))
    if duplicates and is_master(args):
        logging.warning(f"similarity pass: {duplicates} samples share a key (or a key hash) with another")
    return PassResult(all_ids, all_sims.astype(np.float32), all_poisoned.astype(np.int8), keys, offset,
                      time.time() - start)


def log_dir(args):
    if not args.logs or args.logs.lower() == "none":
        return None
    return os.path.join(args.logs, args.name, "similarity")


def write_log(args, result, clean_prob, safe, epoch):
    """One Parquet file per mixed epoch: key, similarity, clean_prob, safe, epoch (+ poisoned if known)."""
    folder = log_dir(args)
    if folder is None:
        return None
    parts = os.path.join(folder, f".parts-epoch_{epoch:03d}")
    os.makedirs(parts, exist_ok=True)
    rows = result.local
    columns = {
        "key": pa.array(result.keys, pa.string()),
        "similarity": pa.array(result.similarity[rows], pa.float32()),
        "clean_prob": pa.array(np.asarray(clean_prob[rows], dtype=np.float32), pa.float32()),
        "safe": pa.array(np.asarray(safe[rows], dtype=bool)),
        "epoch": pa.array(np.full(len(result.keys), epoch, dtype=np.int32)),
    }
    if (result.poisoned >= 0).any():
        columns["poisoned"] = pa.array(result.poisoned[rows] == 1)
    pq.write_table(pa.table(columns), os.path.join(parts, f"rank{args.rank:05d}.parquet"))
    if args.distributed:
        dist.barrier()
    target = os.path.join(folder, f"epoch_{epoch:03d}.parquet")
    if is_master(args):
        # this run's ranks only: a run stopped mid-pass may have left parts of another world size
        part_files = [os.path.join(parts, f"rank{rank:05d}.parquet") for rank in range(args.world_size)]
        schema = pq.read_schema(part_files[0])
        with pq.ParquetWriter(target + ".tmp", schema) as writer:
            for part in part_files:
                writer.write_table(pq.read_table(part))
        os.replace(target + ".tmp", target)
        shutil.rmtree(parts)
    return target
