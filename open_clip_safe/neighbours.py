"""A second signal from the embeddings the similarity pass computes anyway (--safeclip-score neighbours).

Two marks of a poison that the image-caption similarity alone misses (docs/design.md#second-signal):

- **copies**: a targeted poison puts one image into the data many times, each with a caption naming
  the adversarial class. Copies embed to the same point; a 256-bit SimHash of each image embedding
  (signs of fixed random projections) makes them a group of equal 64-bit digests, found in O(N)
  however many samples there are, with no neighbour search.
- **inconsistency**: a poisoned caption names something that the captions of its image's nearest
  neighbours do not (`caption_agreement`), and a poisoned image looks unlike the images of its
  caption's nearest neighbours (`image_agreement`). Copies of the sample's own image are left out
  of its neighbours, or a targeted image's copies would vouch for each other.

The same search gives each pair a **relative similarity** (--safeclip-rank-similarity relative): its
image-caption cosine less the 75th percentile of the cosines of the pairs whose captions are its
caption's nearest neighbours. A caption that the model has come to match well with any image (a
class that a safe set favoured) lifts every pair that carries it, a backdoor's poisons too; relative
to the pairs that carry captions like theirs the poisons stay low (docs/design.md#second-signal).

Every sample is scored once, on the rank that embedded it, against a reference set: all samples up
to --safeclip-neighbour-reference, a fixed random subset of that size beyond. The reference's
embeddings reach every rank over the host group; the search runs on the training device in chunks.
Rank 0 then flags copies and the --safeclip-score-quantile least consistent samples; the split ranks
flagged samples last (schedule.SafeclipSchedule.split).
"""
import contextlib
import logging
import time

import numpy as np
import torch

from open_clip_safe import collectives

COPY_COSINE = 0.999  # image embeddings this close are copies of one image (poisons' copies: > 0.9999)
IMAGE_NEIGHBOURS = 10  # a caption is compared with the captions of this many image neighbours
CAPTION_NEIGHBOURS = 20  # an image with the images of this many caption neighbours
RELATIVE_QUANTILE = 0.75  # a clean pair's cosine while poisons are under 3/4 of a caption's neighbours
EXTRA_CANDIDATES = 128  # fetched beyond k, for the copies and the sample itself to drop out
SIMHASH_BITS = 256
QUERY_CHUNK, REFERENCE_CHUNK = 1024, 65536
MIX = np.uint64(0x9E3779B97F4A7C15)


def projection(dim, device):
    """The fixed random hyperplanes of the SimHash (the same on every rank and in every epoch)."""
    generator = torch.Generator().manual_seed(20240731)
    return torch.randn(dim, SIMHASH_BITS, generator=generator).to(device)


@contextlib.contextmanager
def exact_fp32_matmuls():
    """fp32 matmuls without TF32 inside the block, whatever open_clip set for training (it turns TF32
    on for CUDA): TF32 keeps 10 mantissa bits, enough to flip a SimHash sign, so a GPU and a CPU run
    would give one embedding different digests."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def image_digests(image_features, planes):
    """A 64-bit digest of each embedding's 256 SimHash bits: equal for copies of one image. Taken from
    the float16 rows the pass keeps, in exact fp32, so that any device gives those rows the same digest."""
    with exact_fp32_matmuls():
        bits = (image_features.to(torch.float16).float() @ planes > 0).cpu().numpy()
    words = np.packbits(bits, axis=1).view(np.uint64)  # 4 words of 64 bits
    digest = words[:, 0].copy()
    for column in range(1, words.shape[1]):
        digest = digest * MIX + words[:, column]
    return digest.view(np.int64)


def reference_members(ids, total, size):
    """Which samples form the reference set: all of them up to `size`, else a fixed random subset of
    about `size`, chosen by a hash of the sample id (so every rank and epoch agrees)."""
    if total <= size:
        return np.ones(len(ids), dtype=bool)
    mixed = np.asarray(ids, dtype=np.int64).view(np.uint64) * MIX
    mixed ^= mixed >> np.uint64(31)
    return mixed < np.uint64(size / total * 2.0**64)


def top_candidates(queries, keys, count):
    """The `count` largest cosines of each query among all keys, chunk by chunk: (values, indices)."""
    best_values = queries.new_zeros(len(queries), 0)
    best_indices = torch.zeros(len(queries), 0, dtype=torch.long, device=queries.device)
    for begin in range(0, len(keys), REFERENCE_CHUNK):
        block = queries @ keys[begin:begin + REFERENCE_CHUNK].T
        values, indices = block.topk(min(count, block.shape[1]), dim=1)
        values, indices = torch.cat([best_values, values], dim=1), torch.cat([best_indices, indices + begin], dim=1)
        best_values, order = values.topk(min(count, values.shape[1]), dim=1)
        best_indices = indices.gather(1, order)
    return best_values, best_indices


def neighbour_quantile(values_of_candidate, valid, k, quantile):
    """The `quantile` of each row's values over its first k valid candidates (0 where none is valid)."""
    if not values_of_candidate.shape[1]:  # an empty reference set
        return values_of_candidate.new_zeros(len(values_of_candidate), dtype=torch.float32)
    chosen = valid & (valid.cumsum(dim=1) <= k)
    value = torch.nanquantile(values_of_candidate.float().masked_fill(~chosen, float("nan")), quantile, dim=1)
    return torch.nan_to_num(value, nan=0.0)


def agreement(own, others_of_candidate, valid, k):
    """Mean cosine of each sample's `own` embedding with those of its first k valid candidates."""
    cosines = (others_of_candidate * own[:, None, :]).sum(dim=-1)
    rank_among_valid = valid.cumsum(dim=1)
    chosen = valid & (rank_among_valid <= k)
    return (cosines * chosen).sum(dim=1) / chosen.sum(dim=1).clamp(min=1)


def local_scores(image, text, ids, reference_image, reference_text, reference_ids, device, dtype):
    """caption_agreement, image_agreement, copy_seen (a reference sample other than itself has a copy
    of its image) and relative_similarity of this rank's samples against the reference set."""
    keys_image, keys_text = reference_image.to(device, dtype), reference_text.to(device, dtype)
    # The copy check in fp32 on every device: in float16 both a cosine of 0.9992 and COPY_COSINE round
    # to 0.99902, and the copy is missed.
    keys_exact = keys_image if dtype == torch.float32 else reference_image.to(device, torch.float32)
    reference_ids = torch.as_tensor(reference_ids, device=device)
    reference_similarity = (reference_image.float() * reference_text.float()).sum(dim=-1).to(device)
    captions, images, copies, relative = [], [], [], []
    for begin in range(0, len(image), QUERY_CHUNK):
        query_exact = image[begin:begin + QUERY_CHUNK].to(device, torch.float32)
        query_image = query_exact.to(dtype)
        query_text = text[begin:begin + QUERY_CHUNK].to(device, dtype)
        query_ids = torch.as_tensor(ids[begin:begin + QUERY_CHUNK], device=device)
        results = []
        for queries, keys, others, k in ((query_image, keys_image, keys_text, IMAGE_NEIGHBOURS),
                                         (query_text, keys_text, keys_image, CAPTION_NEIGHBOURS)):
            _, candidates = top_candidates(queries, keys, k + EXTRA_CANDIDATES)
            copy = (keys_exact[candidates] * query_exact[:, None, :]).sum(dim=-1) > COPY_COSINE
            other = reference_ids[candidates] != query_ids[:, None]
            if keys is keys_image:  # its image's nearest neighbours: any copy is among them
                copies.append((copy & other).any(dim=1).cpu())
            own = query_text if others is keys_text else query_image
            results.append(agreement(own, others[candidates], ~copy & other, k))
            if keys is keys_text:
                own_similarity = (query_exact * query_text.float()).sum(dim=-1)
                relative.append((own_similarity - neighbour_quantile(reference_similarity[candidates],
                                                                     ~copy & other, k, RELATIVE_QUANTILE)).cpu())
        captions.append(results[0].float().cpu())
        images.append(results[1].float().cpu())
    empty = torch.zeros(0)
    return ((torch.cat(captions) if captions else empty).numpy(), (torch.cat(images) if images else empty).numpy(),
            (torch.cat(copies) if copies else empty.bool()).numpy().astype(np.uint8),
            (torch.cat(relative) if relative else empty).numpy())


def gather_reference(args, image, text, ids, members, counts):
    """Every rank's reference members' embeddings (float16, host memory) and ids, on every rank."""
    member_counts = collectives.all_gather_counts(args, int(members.sum()))
    width = image.shape[1]
    rows = {}
    for name, features in (("image", image), ("text", text)):
        flat = features[torch.from_numpy(members)].to(torch.float16).reshape(-1).numpy()
        gathered = collectives.gather_rows(args, flat, [count * width for count in member_counts])
        rows[name] = torch.from_numpy(gathered.reshape(-1, width))
    return rows["image"], rows["text"], collectives.gather_rows(args, ids[members], member_counts)


def second_signal(args, result):
    """The second signal of every sample, from the pass's embeddings (`result.image`, `.text`, `.digests`
    of this rank's samples): on rank 0 a dict of the flagged mask and the log's columns (copies,
    consistency, relative similarity) plus the seconds it took, None on the other ranks."""
    start = time.time()
    ids = result.local_ids
    members = reference_members(ids, result.num_samples, args.safeclip_neighbour_reference)
    reference_image, reference_text, reference_ids = gather_reference(args, result.image, result.text, ids, members,
                                                                      result.counts)
    if not len(reference_ids):
        logging.warning("SafeCLIP second signal: the neighbour reference set is empty "
                        "(--safeclip-neighbour-reference too small?); only copies by digest are flagged")
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.float16  # CPU matmuls in half are slow
    caption_agreement, image_agreement, copy_seen, relative = local_scores(
        result.image, result.text, ids, reference_image, reference_text, reference_ids, device, dtype)
    gathered = [collectives.gather_rows(args, values, result.counts, dst=0)
                for values in (result.digests, caption_agreement, image_agreement, copy_seen, relative)]
    if args.rank != 0:
        return None
    flagged, copies, consistency = flag(*gathered[:4], args.safeclip_score_quantile)
    relative = gathered[4].astype(np.float32)
    columns = {"copy": copies, "consistency": consistency, "relative_similarity": relative}
    return {"flagged": flagged, "columns": columns, "reference": len(reference_ids), "seconds": time.time() - start}


def percentile_rank(values):
    """Each value's share of the values at or below it (ties share the higher rank), in (0, 1]."""
    order = np.sort(values)
    return np.searchsorted(order, values, side="right") / max(1, len(values))


def flag(digests, caption_agreement, image_agreement, copy_seen, quantile):
    """Rank 0: which samples the second signal flags, and the consistency each got.

    Flagged: every sample whose image digest another sample shares or that saw a copy of its image
    among its reference neighbours (copies: the digest finds them all, the cosine those whose
    embeddings differ by rounding, as fp16 batches of other sizes may), and the `quantile` of
    samples whose consistency, percentile_rank(caption agreement) + percentile_rank(image agreement),
    ranks lowest."""
    _, inverse, count = np.unique(digests, return_inverse=True, return_counts=True)
    copies = (count[inverse.reshape(-1)] > 1) | np.asarray(copy_seen, dtype=bool)
    consistency = (percentile_rank(caption_agreement) + percentile_rank(image_agreement)).astype(np.float32)
    inconsistent = percentile_rank(consistency) <= quantile
    return copies | inconsistent, copies, consistency
