"""The per-sample similarity pass before each mixed epoch, and its Parquet log.

Every training sample is embedded exactly once across all ranks (no padding: padded duplicates
would enter the mixture fit), in eval mode without gradients, through the unwrapped model so that
ranks with different sample counts never meet in a DDP collective (docs/design.md#similarity-pass).
Every rank gets every sample's id (for the split lookup); rank 0 also gets the similarities and
poison codes (for the split and its diagnostics). Rank 0 writes the log from those arrays and the
keys the other ranks send it, so no rank reads a file another node wrote.
"""
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from open_clip import get_input_dtype
from open_clip_train.distributed import is_master
from open_clip_train.precision import get_autocast
from open_clip_train.train import unwrap_model

from open_clip_safe import collectives, neighbours
from open_clip_safe.cli import log_lines, progress
from open_clip_safe.data import POISON_KINDS
from open_clip_safe.files import as_disk_full
from open_clip_safe.loss import embed_dim_of

KEY_CHUNK = 1 << 18  # keys a rank sends rank 0 per transfer while the log is written
SOURCE_KEY = "similarity_source"  # the log's schema metadata: "pass" or "training" (PassResult.source)


@dataclass
class PassResult:
    """The pass over all samples, rank-major: rows [starts[r], starts[r] + counts[r]) came from rank r.

    `ids` is on every rank; `similarity` and `poison` (codes: -1 unknown, else an index into
    data.POISON_KINDS) on rank 0 only; `keys` are this rank's own (None when no log is written), and
    so are `image`, `text` (float16 embeddings, host memory) and `digests`, which are kept only for
    the second signal (--safeclip-score neighbours). `source` says where the similarities come from:
    "pass" (this module) or "training" (--safeclip-fast: the training steps' cosines, `refreshed` of
    them this epoch, `unknown` trained ids the pass never saw; open_clip_safe.training_scores).
    """

    ids: np.ndarray
    similarity: np.ndarray
    poison: np.ndarray
    counts: list
    keys: pa.Array
    seconds: float
    rank: int = 0
    image: torch.Tensor = None
    text: torch.Tensor = None
    digests: np.ndarray = None
    source: str = "pass"
    refreshed: int = None
    unknown: int = None

    @property
    def num_samples(self):
        return sum(self.counts)

    @property
    def local_ids(self):
        begin = sum(self.counts[:self.rank])
        return self.ids[begin:begin + self.counts[self.rank]]

    @property
    def poisoned(self):
        return None if self.poison is None or not (self.poison >= 0).any() else self.poison > 0


@torch.no_grad()
def similarity_pass(model, data, args, epoch):
    """Cosine similarity of each sample's image with its caption (view 1 or plain views), for all samples."""
    start = time.time()
    device = torch.device(args.device)
    autocast = get_autocast(args.precision, device_type=device.type)
    input_dtype = get_input_dtype(args.precision)
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    batch_size = args.safeclip_sim_batch_size or 2 * args.batch_size
    keep_keys = log_dir(args) is not None
    keep_embeddings = args.safeclip_score == "neighbours"
    width = embed_dim_of(args.model) if keep_embeddings else None
    planes = neighbours.projection(width, device) if keep_embeddings else None
    ids, sims, poison, keys, image_rows, text_rows, digests = [], [], [], [], [], [], []
    expected = -(-data.num_samples // (batch_size * args.world_size))
    batches = progress(data.pass_loader(batch_size), enabled=is_master(args), log=log_lines, total=expected,
                       desc=f"similarity pass (epoch {epoch})", unit="batch")
    for batch_ids, batch_keys, batch_poison, images, texts in batches:
        images = data.views.finish_pass_images(images.to(device=device, non_blocking=True)).to(dtype=input_dtype)
        texts = texts.to(device=device, non_blocking=True)
        with autocast():
            image_features = model.encode_image(images, normalize=True)
            text_features = model.encode_text(texts, normalize=True)
        sims.append(F.cosine_similarity(image_features.float(), text_features.float()))  # stays on the device
        ids.append(np.asarray(batch_ids, dtype=np.int64))
        poison.append(np.asarray(batch_poison, dtype=np.int8))
        if keep_keys:
            keys.append(pa.array(list(batch_keys), pa.string()))
        if keep_embeddings:
            image_rows.append(image_features.to(torch.float16).cpu())
            text_rows.append(text_features.to(torch.float16).cpu())
            digests.append(neighbours.image_digests(image_features, planes))
    model.train(was_training)

    local_sims = torch.cat(sims).cpu().numpy() if sims else np.zeros(0, np.float32)  # one device sync
    local_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    local_poison = np.concatenate(poison) if poison else np.zeros(0, np.int8)
    counts = collectives.all_gather_counts(args, len(local_ids))
    all_ids = collectives.gather_rows(args, local_ids, counts)
    all_sims = collectives.gather_rows(args, local_sims, counts, dst=0)
    all_poison = collectives.gather_rows(args, local_poison, counts, dst=0)
    if all_ids is not None and is_master(args):
        duplicates = len(all_ids) - len(np.unique(all_ids))
        if duplicates:
            logging.warning(f"similarity pass: {duplicates} samples share a key (or a key hash) with another")
    local_keys = pa.concat_arrays(keys) if keys else (pa.array([], pa.string()) if keep_keys else None)
    result = PassResult(all_ids, all_sims, all_poison, counts, local_keys, time.time() - start, args.rank)
    if keep_embeddings:
        result.image = torch.cat(image_rows) if image_rows else torch.zeros(0, width, dtype=torch.float16)
        result.text = torch.cat(text_rows) if text_rows else torch.zeros(0, width, dtype=torch.float16)
        result.digests = np.concatenate(digests) if digests else np.zeros(0, np.int64)
    return result


def log_dir(args):
    if not args.logs or args.logs.lower() == "none":
        return None
    return os.path.join(args.logs, args.name, "similarity")


def log_file(args, epoch):
    folder = log_dir(args)
    return None if folder is None else os.path.join(folder, f"epoch_{epoch:03d}.parquet")


def log_columns(result, scores, safe, epoch):
    """Rank 0's rank-major columns of the log, without the key; `scores` maps column names to arrays."""
    columns = {"similarity": pa.array(result.similarity, pa.float32()),
               **{name: pa.array(np.asarray(values)) for name, values in scores.items()},
               "safe": pa.array(np.asarray(safe, dtype=bool)),
               "epoch": pa.array(np.full(result.num_samples, epoch, dtype=np.int32))}
    if result.poisoned is not None:
        columns["poisoned"] = pa.array(result.poisoned)
        kinds = pa.array(result.poison, pa.int8(), mask=result.poison <= 0)  # null for clean samples
        columns["poison_kind"] = pa.DictionaryArray.from_arrays(kinds, pa.array(POISON_KINDS))
    return columns


def write_log(args, result, scores, safe, epoch):
    """One Parquet file per mixed epoch, written by rank 0: key, similarity, the `scores` columns
    (rank 0's: clean_prob, and score where a second signal changed the ranking), safe, epoch, and
    poisoned / poison_kind where the samples' json says; the schema's metadata names the similarity's
    source (SOURCE_KEY). The other ranks send their keys, KEY_CHUNK
    at a time; if rank 0 cannot write, every rank raises its error."""
    target = log_file(args, epoch)
    if target is None:
        return None
    master = args.rank == 0
    starts = np.concatenate([[0], np.cumsum(result.counts)])
    columns = log_columns(result, scores, safe, epoch) if master else None
    temporary, error, writer, sink = f"{target}.tmp-{os.getpid()}", None, None, None
    if master:
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            sink = open(temporary, "wb")
            schema = pa.schema([("key", pa.string())] + [(name, array.type) for name, array in columns.items()],
                               metadata={SOURCE_KEY: result.source})
            writer = pq.ParquetWriter(sink, schema)
        except Exception as failure:  # noqa: BLE001  (reported to every rank below)
            error = failure
    for begin in range(0, max(result.counts), KEY_CHUNK):
        mine = result.keys[begin:begin + KEY_CHUNK]
        pieces = collectives.gather_bytes_to(args, pa.table({"key": mine}).to_batches()[0].serialize().to_pybytes()
                                             if len(mine) else b"")
        if not master or error is not None:
            continue
        try:
            for rank, piece in enumerate(pieces):
                if not piece:
                    continue
                keys = pa.ipc.read_record_batch(piece, pa.schema([("key", pa.string())])).column(0)
                rows = slice(starts[rank] + begin, starts[rank] + begin + len(keys))
                writer.write_table(pa.table({"key": keys, **{n: a[rows] for n, a in columns.items()}}))
        except Exception as failure:  # noqa: BLE001
            error = failure
    if master and error is None:
        try:
            writer.close()
            sink.flush()
            os.fsync(sink.fileno())
            sink.close()
            os.replace(temporary, target)
        except Exception as failure:  # noqa: BLE001
            error = failure
    if master and error is not None:
        error = as_disk_full(temporary, error)
        for closing in (writer, sink):
            try:
                closing is not None and closing.close()
            except Exception:  # noqa: BLE001  (already failing)
                pass
        if os.path.exists(temporary):
            os.remove(temporary)
    message = collectives.broadcast_object(args, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 could not write the similarity log {target}: {message}")
    return target
