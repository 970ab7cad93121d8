"""SafeCLIP's losses on open_clip's ClipLoss machinery (gathering, labels, --local-loss, --gather-with-grad).

Every loss here is a sum of one-way contrastive terms CE(s * queries @ keys.T, arange), gathered
across ranks exactly as open_clip's ClipLoss gathers (image, text) pairs. Under DDP:

- gather_with_grad=True (with or without local_loss): the loss averaged over ranks and the
  gradients DDP averages are those of one process on the global batch.
- gather_with_grad=False, local_loss=False (open_clip's default): every rank computes the global
  loss, but gradients flow only through its own shard, so DDP's average is the single-process
  gradient divided by the world size (as for open_clip's ClipLoss).
- gather_with_grad=False, local_loss=True: the loss averaged over ranks is the global loss; the
  gradients miss the key-side terms of other ranks' rows (as for open_clip's ClipLoss).
"""
import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss, gather_features


class GatheredContrastive(ClipLoss):
    """ClipLoss's gathering and labels applied to one (queries, keys) direction."""

    def one_way_loss(self, queries, keys, logit_scale):
        if self.world_size > 1:
            all_queries, all_keys = gather_features(
                queries, keys, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                rank=self.rank, world_size=self.world_size, use_horovod=self.use_horovod)
            queries = queries if self.local_loss else all_queries
            keys = all_keys
        logits = logit_scale * queries @ keys.T
        return F.cross_entropy(logits, self.get_ground_truth(queries.device, logits.shape[0]))


class NearestNeighbourBank(nn.Module):
    """NNCLR's support set: a FIFO queue of past embeddings, identical on every rank.

    Starts as random unit vectors (from a fixed seed, so every rank starts alike); each step
    enqueues the whole gathered batch, so every rank's queue stays the same. Buffers, so the
    queue is saved and restored with the loss's state_dict.
    """

    def __init__(self, size, dim, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("bank", F.normalize(torch.randn(size, dim, generator=generator), dim=-1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def nearest(self, embeddings):
        """Each embedding's nearest neighbour (cosine) in the queue, without gradient."""
        if self.bank.device != embeddings.device:  # open_clip's main leaves the loss on the CPU
            self.to(embeddings.device)
        bank = self.bank.to(embeddings.dtype)
        similarity = F.normalize(embeddings, dim=-1) @ F.normalize(bank, dim=-1).T
        return bank[similarity.argmax(dim=1)]

    @torch.no_grad()
    def enqueue(self, embeddings):
        size = self.bank.shape[0]
        embeddings = embeddings.detach()[-size:].to(self.bank.dtype)
        slots = (self.pointer + torch.arange(len(embeddings), device=self.bank.device)) % size
        self.bank[slots] = embeddings
        self.pointer.copy_((self.pointer + len(embeddings)) % size)


class InModalLoss(GatheredContrastive):
    """Mean of an image-image and a text-text contrastive loss between two augmented views.

    The positive of view 2 is view 1 itself, or with a memory bank (bank_size > 0) view 1's
    nearest neighbour among the bank's contents before this batch is enqueued.
    """

    needs_both_views = True

    def __init__(self, bank_size=0, embed_dim=None, **clip_loss_args):
        super().__init__(**clip_loss_args)
        self.image_bank = self.text_bank = None
        if bank_size:
            self.image_bank = NearestNeighbourBank(bank_size, embed_dim, seed=0)
            self.text_bank = NearestNeighbourBank(bank_size, embed_dim, seed=1)

    def positives(self, view1, bank):
        if bank is None:
            return view1
        positives = bank.nearest(view1)
        bank.enqueue(self.gather_detached(view1))
        return positives

    def gather_detached(self, features):
        if self.world_size == 1:
            return features.detach()
        gathered = [torch.empty_like(features) for _ in range(self.world_size)]
        dist.all_gather(gathered, features.detach().contiguous())
        return torch.cat(gathered)

    def forward(self, image_v1, image_v2, text_v1, text_v2, logit_scale):
        image_loss = self.one_way_loss(image_v2, self.positives(image_v1, self.image_bank), logit_scale)
        text_loss = self.one_way_loss(text_v2, self.positives(text_v1, self.text_bank), logit_scale)
        return {"inmodal_loss": (image_loss + text_loss) / 2}


class CrossAugClipLoss(GatheredContrastive):
    """CLIP loss across augmented views: image v1 against caption t2, caption t1 against image v2.

    cross_aug=False is open_clip's ClipLoss on (v1, t1).
    """

    def __init__(self, cross_aug=True, **clip_loss_args):
        super().__init__(**clip_loss_args)
        self.cross_aug = cross_aug
        self.needs_both_views = cross_aug

    def forward(self, image_v1, image_v2, text_v1, text_v2, logit_scale):
        if not self.cross_aug:
            return {"contrastive_loss": super().forward(image_v1, text_v1, logit_scale)}
        image_to_text = self.one_way_loss(image_v1, text_v2, logit_scale)
        text_to_image = self.one_way_loss(text_v1, image_v2, logit_scale)
        return {"contrastive_loss": (image_to_text + text_to_image) / 2}


def sorted_members(sorted_ids, ids):
    """Which of `ids` are in `sorted_ids` (np.isin sorts both on every call; this searches the sorted one)."""
    if not len(sorted_ids):
        return np.zeros(len(ids), dtype=bool)
    return sorted_ids[np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)] == ids


class UnlearnSuspects(nn.Module):
    """Pushes a suspect's image views off its own caption: relu(scale * cos), over the batch and both views.

    The warm-up trains on every sample, so keeping poisons out of the safe sets cannot take back what it
    learned of a trigger (docs/defense.md#unlearning-the-suspects); this does, for the suspects. Caption and
    scale are detached: the caption (a target class's, say) stays where the safe set puts it, and the loss
    cannot shrink the scale. A view orthogonal to its caption is pushed no further."""

    def for_suspects(self, suspect_ids):
        suspect_ids = np.sort(np.asarray(suspect_ids, dtype=np.int64))

        def unlearn(ids, image_v1, image_v2, text_v1, logit_scale):
            suspect = torch.from_numpy(sorted_members(suspect_ids, np.asarray(ids, dtype=np.int64)))
            suspect = suspect.to(image_v1.device)
            return self(image_v1, image_v2, text_v1, suspect, logit_scale)
        return unlearn

    def forward(self, image_v1, image_v2, text_v1, suspect, logit_scale):
        caption, scale = text_v1.detach(), logit_scale.detach()
        push = F.relu(scale * (image_v1 * caption).sum(-1)) + F.relu(scale * (image_v2 * caption).sum(-1))
        return {"unlearn_loss": (push * suspect).sum() / (2 * len(push))}


def embed_dim_of(model_name):
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"--safeclip-memory-bank-size needs the embedding size; no model config named {model_name!r}")
    return config["embed_dim"]


class SafeclipLosses(nn.Module):
    """The two losses of a SafeCLIP run, built from open_clip's arguments plus the SafeCLIP flags."""

    def __init__(self, args):
        super().__init__()
        clip_loss_args = dict(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                              rank=args.rank, world_size=args.world_size, use_horovod=args.horovod)
        bank_size = args.safeclip_memory_bank_size
        self.inmodal = InModalLoss(bank_size=bank_size, embed_dim=embed_dim_of(args.model) if bank_size else None,
                                   **clip_loss_args)
        self.clip = CrossAugClipLoss(cross_aug=args.safeclip_cross_aug, **clip_loss_args)
        self.unlearn = UnlearnSuspects()
