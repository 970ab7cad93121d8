"""--safeclip-fast: the next split from the cosines the training steps already compute (docs/design.md#fast-mode).

A mixed epoch's risky (in-modal) and safe (CLIP) steps both embed every image and caption they
train on, so the image-caption cosine of each trained sample comes for free. Fast mode records
it per step, on the device, by sample id; after the epoch rank 0 gathers them and writes them over
the similarities of the last real pass, in that pass's rank-major order, so the next split, its log
(with the pass's keys) and its detector metrics run unchanged. Samples no step trained this epoch
(the remainder of a global batch, a skipped sub-epoch) keep their previous score.
"""
import logging
import time
from dataclasses import replace

import numpy as np
import torch

from open_clip_safe import collectives


def pair_cosines(image_v1, image_v2, text_v1, text_v2):
    """Per-sample image-caption cosine of a training step's (normalized) features, mean over the views;
    with one view (v2 is v1) it is that view's cosine."""
    with torch.no_grad():
        one = (image_v1.float() * text_v1.float()).sum(-1)
        if image_v2 is image_v1 and text_v2 is text_v1:
            return one
        return (one + (image_v2.float() * text_v2.float()).sum(-1)) / 2


class TrainingScores:
    """One mixed epoch's cosines from the training steps, kept over the last pass's arrays.

    Holds the pass's ids (every rank; the next lookup is built from a copy), keys (this rank's, for
    the log), and on rank 0 the similarities, poison codes and the ids' argsort (the id -> row index).
    """

    def __init__(self, result, rank):
        self.result = replace(result, image=None, text=None, digests=None, source="training")
        self.order = np.argsort(result.ids, kind="stable") if rank == 0 else None
        self.ids, self.cosines = [], []

    def record(self, ids, cosines):
        self.ids.append(np.asarray(ids, dtype=np.int64))
        self.cosines.append(cosines.detach().float())  # stays on the device until `collect`

    def collect(self, args):
        """Rank 0's similarities with this epoch's cosines written in: the PassResult the next split reads,
        with `refreshed` (samples a step scored) and `unknown` (ids the pass never saw) counted on rank 0."""
        start = time.time()
        local_ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
        local_cosines = torch.cat(self.cosines).cpu().numpy() if self.cosines else np.zeros(0, np.float32)
        self.ids, self.cosines = [], []
        counts = collectives.all_gather_counts(args, len(local_ids))
        ids = collectives.gather_rows(args, local_ids, counts, dst=0)
        cosines = collectives.gather_rows(args, local_cosines, counts, dst=0)
        result = self.result
        result.refreshed = result.unknown = None
        if args.rank == 0:
            known = result.ids
            where = np.clip(np.searchsorted(known, ids, sorter=self.order), 0, max(0, len(known) - 1))
            rows = self.order[where] if len(known) else where
            found = known[rows] == ids if len(known) else np.zeros(len(ids), bool)
            result.similarity[rows[found]] = cosines[found]
            refreshed = np.zeros(len(known), bool)
            refreshed[rows[found]] = True
            result.refreshed, result.unknown = int(refreshed.sum()), int((~found).sum())
            if result.unknown:
                logging.warning(f"SafeCLIP fast mode: {result.unknown} trained samples have ids the similarity pass "
                                f"did not see; their cosines are dropped")
        result.seconds = time.time() - start
        return result
