"""The second signal (--safeclip-score neighbours): copies by SimHash digest, neighbour agreement,
the reference set, the flags, and the split that ranks flagged samples last."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from open_clip_safe import collectives, neighbours
from open_clip_safe.schedule import SafeclipSchedule, SplitRule, top_fraction_mask
from open_clip_safe.similarity import PassResult


def unit(rows):
    return torch.nn.functional.normalize(torch.as_tensor(rows, dtype=torch.float32), dim=-1)


def clustered_world(seed=0, classes=8, per_class=40, dim=32):
    """Images and captions of `classes` concepts: each sample near its class centre in both towers."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    image = unit(centres[labels] + 0.3 * rng.normal(size=(len(labels), dim)))
    text = unit(centres[labels] + 0.3 * rng.normal(size=(len(labels), dim)))
    return image, text, labels, centres


def test_copies_of_one_image_share_a_digest_and_nothing_else_does():
    image, _, _, _ = clustered_world()
    copies = image[[5] * 6]
    planes = neighbours.projection(image.shape[1], "cpu")
    digests = neighbours.image_digests(torch.cat([image, copies + 1e-7]), planes)
    assert len(np.unique(digests[:len(image)])) == len(image), "distinct images, distinct digests"
    assert (digests[len(image):] == digests[5]).all()
    np.testing.assert_array_equal(neighbours.image_digests(image, planes), digests[:len(image)])  # fixed planes


def near_copy_pair(dim=32, low=0.99905, high=0.99925):
    """Two float16 unit rows whose exact cosine is just above COPY_COSINE: copies, which a float16 check
    misses (the cosine rounds to 0.99902, and so does the threshold it is compared with)."""
    rng = np.random.default_rng(0)
    for _ in range(1000):
        a = unit(rng.normal(size=(1, dim)))
        b = unit(a.numpy() + 0.0077 * rng.normal(size=(1, dim)))  # a cosine near 1 - 32 * 0.0077**2 / 2
        rows = torch.cat([a, b]).to(torch.float16)
        cosine = float(rows[0].float() @ rows[1].float())
        half = rows[:1] @ rows[1:].T
        if low < cosine < high and not (half > neighbours.COPY_COSINE).any():
            return rows
    raise AssertionError("no such pair in 1000 draws")


def test_the_copy_check_is_fp32_whatever_the_search_dtype():
    """On CUDA the neighbour search runs in float16; the copy check must not, or a GPU run misses
    copies that a CPU run of the same embeddings flags."""
    image, text, _, _ = clustered_world()
    pair = near_copy_pair()
    image = torch.cat([image, pair.float()]).to(torch.float16)
    text = torch.cat([text, text[:2]]).to(torch.float16)
    ids = np.arange(len(image))
    results = [neighbours.local_scores(image, text, ids, image, text, ids, torch.device("cpu"), dtype)
               for dtype in (torch.float32, torch.float16)]
    assert set(np.flatnonzero(results[0][2])) == {len(image) - 2, len(image) - 1}
    np.testing.assert_array_equal(results[1][2], results[0][2])


def test_digests_are_exact_fp32_of_the_kept_rows_and_restore_the_run_precision():
    image, _, _, _ = clustered_world()
    planes = neighbours.projection(image.shape[1], "cpu")
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what open_clip's TF32 setting reads as
    try:
        inside = []
        with neighbours.exact_fp32_matmuls():
            inside.append(torch.get_float32_matmul_precision())
        with pytest.raises(KeyboardInterrupt), neighbours.exact_fp32_matmuls():
            raise KeyboardInterrupt
        assert inside == ["highest"] and torch.get_float32_matmul_precision() == "high"
        digests = neighbours.image_digests(image, planes)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved)
    np.testing.assert_array_equal(digests, neighbours.image_digests(image.to(torch.float16), planes))
    np.testing.assert_array_equal(digests, neighbours.image_digests(image.to(torch.float16).double().float(), planes))


def test_reference_set_is_everything_up_to_its_size_then_a_fixed_subset():
    ids = np.random.default_rng(0).integers(0, 2**63 - 1, 20_000)
    assert neighbours.reference_members(ids, 20_000, 20_000).all()
    members = neighbours.reference_members(ids, 20_000, 2_000)
    assert 1_800 < members.sum() < 2_200
    np.testing.assert_array_equal(members, neighbours.reference_members(ids.copy(), 20_000, 2_000))
    rows = np.arange(20_000)  # CSV ids are row numbers: the hash still spreads the choice
    assert 1_800 < neighbours.reference_members(rows, 20_000, 2_000)[:10_000].sum() * 2 < 2_200


def test_a_caption_unlike_its_neighbours_captions_agrees_least():
    image, text, labels, centres = clustered_world()
    wrong = np.arange(0, len(labels), 37)  # these captions describe another class
    text = text.clone()
    text[wrong] = unit(centres[(labels[wrong] + 1) % 8] + 0.3 * np.random.default_rng(1).normal(size=(len(wrong), 32)))
    ids = np.arange(len(labels))
    captions, images, copy_seen, _ = neighbours.local_scores(image, text, ids, image, text, ids, torch.device("cpu"),
                                                          torch.float32)
    assert not copy_seen.any()
    assert set(np.argsort(captions)[:len(wrong)]) == set(wrong)
    assert set(np.argsort(images)[:len(wrong)]) == set(wrong)


def test_relative_similarity_is_the_cosine_less_a_high_quantile_of_the_caption_neighbours_pairs():
    image, text, labels, _ = clustered_world()
    ids = np.arange(len(labels))
    *_, relative = neighbours.local_scores(image, text, ids, image, text, ids, torch.device("cpu"), torch.float32)
    own = (image * text).sum(dim=-1)
    for sample in (0, 57, 301):
        cosines = text[sample] @ text.T
        cosines[sample] = -2  # a sample is not its own neighbour
        nearest = cosines.argsort(descending=True)[:neighbours.CAPTION_NEIGHBOURS]
        expected = np.quantile(own[nearest].numpy(), neighbours.RELATIVE_QUANTILE)  # linear, as torch's
        assert relative[sample] == pytest.approx(own[sample].item() - expected, abs=1e-5)


def backdoored_world(poisons, seed=3, classes=8, per_class=40, dim=32):
    """Classes that match their captions unevenly (class 0, the target, best), and `poisons` pairs of
    other classes' images that have learned a little of the target, captioned as the target."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    noise = np.linspace(0.15, 1.0, classes)[labels][:, None]
    image = unit(centres[labels] + noise * rng.normal(size=(len(labels), dim)))
    text = unit(centres[labels] + noise * rng.normal(size=(len(labels), dim)))
    others = rng.choice(np.arange(1, classes), size=poisons)
    image = torch.cat([image, unit(centres[others] + 0.8 * centres[0] + 0.3 * rng.normal(size=(poisons, dim)))])
    text = torch.cat([text, unit(centres[[0] * poisons] + 0.15 * rng.normal(size=(poisons, dim)))])
    ids = np.arange(len(image))
    *_, relative = neighbours.local_scores(image, text, ids, image, text, ids, torch.device("cpu"), torch.float32)
    return (image * text).sum(dim=-1).numpy(), relative, ids[len(labels):]


def test_a_backdoor_on_a_well_matched_caption_ranks_low_relative_to_its_caption_neighbours():
    """The tiles-noise world's leak in miniature (docs/defense.md): by raw cosine the backdoor's pairs
    sit among the classes that match their captions less well, so a safe set of the top 80% takes most
    of them; relative to the pairs that carry captions like theirs they rank lowest, and it takes none."""
    raw, relative, poisons = backdoored_world(poisons=20)
    assert top_fraction_mask(raw, 0.8)[poisons].sum() > len(poisons) / 2
    assert not top_fraction_mask(relative, 0.8)[poisons].any()


def test_the_relative_similarity_holds_while_poisons_are_most_of_a_captions_pairs(monkeypatch):
    """60 poisons against 40 clean pairs of the target's captions: the neighbours' median is often a
    poison's cosine, their 75th percentile still a clean pair's."""
    kept = {}
    for quantile in (0.5, 0.75):
        monkeypatch.setattr(neighbours, "RELATIVE_QUANTILE", quantile)
        _, relative, poisons = backdoored_world(poisons=60)
        kept[quantile] = int(top_fraction_mask(relative, 0.8)[poisons].sum())
    assert kept[0.5] > 20 and kept[0.75] <= 5, kept


def test_copies_do_not_vouch_for_each_other():
    """A targeted poison: one image 12 times, captions of another class. Without leaving copies out,
    each copy's neighbours would be its own copies, whose captions agree with it."""
    image, text, labels, centres = clustered_world()
    poison_image = image[[3] * 12]
    poison_text = unit(centres[[6] * 12] + 0.3 * np.random.default_rng(2).normal(size=(12, 32)))
    image, text = torch.cat([image, poison_image]), torch.cat([text, poison_text])
    ids = np.arange(len(image))
    captions, _, copy_seen, _ = neighbours.local_scores(image, text, ids, image, text, ids, torch.device("cpu"),
                                                     torch.float32)
    assert captions[-12:].max() < np.percentile(captions[:-12], 5)
    # image 3 and its 12 copies see one another; a copy that rounding moved off the digest is still found
    assert set(np.flatnonzero(copy_seen)) == {3} | set(range(len(image) - 12, len(image)))


def test_copies_whose_digests_differ_are_found_by_cosine():
    image, text, _, _ = clustered_world()
    planes = neighbours.projection(32, "cpu")
    bits = image[5] @ planes
    nudge = planes[:, bits.abs().argmin()] * (-2.5 * bits[bits.abs().argmin()] / planes[:, bits.abs().argmin()].norm() ** 2)
    near_copy = unit((image[5] + nudge)[None].numpy())  # the same image, one SimHash bit flipped
    assert (near_copy[0] @ image[5]).item() > neighbours.COPY_COSINE
    image, text = torch.cat([image, near_copy]), torch.cat([text, text[5:6]])
    digests = neighbours.image_digests(image, planes)
    assert digests[5] != digests[-1], "the digest alone misses this copy"
    ids = np.arange(len(image))
    captions, images, copy_seen, _ = neighbours.local_scores(image, text, ids, image, text, ids, torch.device("cpu"),
                                                          torch.float32)
    _, copies, _ = neighbours.flag(digests, captions, images, copy_seen, quantile=0.0)
    assert set(np.flatnonzero(copies)) == {5, len(image) - 1}


def test_an_empty_reference_set_flags_only_copies(caplog):
    image, text, _, _ = clustered_world(per_class=5)
    ids = np.arange(len(image), dtype=np.int64)
    result = PassResult(ids=ids, similarity=None, poison=None, counts=[len(ids)], keys=None, seconds=0.0, rank=0,
                        image=image.half(), text=text.half(),
                        digests=neighbours.image_digests(image, neighbours.projection(32, "cpu")))
    args = SimpleNamespace(rank=0, world_size=1, distributed=False, device="cpu", safeclip_neighbour_reference=2,
                           safeclip_score_quantile=0.0)
    ids[:] = 2**62  # a hash that puts no sample into a reference of 2 out of 40
    assert not neighbours.reference_members(ids, len(ids), 2).any()
    signal = neighbours.second_signal(args, result)
    assert signal["reference"] == 0 and not signal["flagged"].any()
    assert "neighbour reference set is empty" in caplog.text


def test_flags_are_copies_and_the_least_consistent_quantile():
    digests = np.array([7, 7, 1, 2, 3, 4, 5, 6, 8, 9], dtype=np.int64)
    agreement = np.linspace(0, 1, 10)
    none_seen = np.zeros(10, np.uint8)
    flagged, copies, consistency = neighbours.flag(digests, agreement, agreement, none_seen, quantile=0.2)
    assert copies.tolist() == [True, True] + [False] * 8
    assert flagged.tolist() == [True, True, False, False, False, False, False, False, False, False]
    flagged, _, _ = neighbours.flag(digests, agreement[::-1].copy(), agreement[::-1].copy(), none_seen, quantile=0.2)
    assert flagged.tolist() == [True, True] + [False] * 6 + [True, True]
    seen = none_seen.copy()
    seen[5] = 1
    assert neighbours.flag(digests, agreement, agreement, seen, quantile=0.0)[1].tolist() == [
        True, True, False, False, False, True, False, False, False, False]
    assert consistency.dtype == np.float32


def test_the_split_ranks_flagged_samples_last():
    rng = np.random.default_rng(0)
    similarity = np.concatenate([rng.normal(0.6, 0.05, 900), rng.normal(0.1, 0.05, 100)]).astype(np.float32)
    flagged = np.zeros(1000, bool)
    flagged[:50] = True  # 50 high-similarity samples the second signal flags
    schedule = SafeclipSchedule(rule=SplitRule("topk", fraction_start=0.9), inmodal_epochs=1, crossmodal_epochs=0,
                                epochs=3, num_samples=1000, steps_per_epoch=10, steps_for=lambda n: n // 100,
                                inmodal_lr=1e-3, cross_lr=1e-3, filter_lr=1e-5, warmup=1)
    split = schedule.split(1, similarity, flagged)
    assert split.safe.sum() == 900 and not split.safe[:50].any() and split.safe[50:900].all()
    assert set(split.log_columns()) == {"clean_prob", "score"}
    np.testing.assert_allclose(split.score, split.clean_prob - 2.0 * flagged, atol=1e-6)
    assert set(schedule.split(2, similarity).log_columns()) == {"clean_prob"}


def test_second_signal_under_a_two_rank_nccl_group_uses_host_collectives(monkeypatch):
    """Rank 0 of two (the other holding the same rows, test_nccl's stand-in): every collective of the
    second signal goes over the gloo host group with CPU tensors."""
    from test_nccl import FakeNcclDist

    fake = FakeNcclDist()
    monkeypatch.setattr(collectives, "dist", fake)
    collectives._HOST_GROUPS.clear()
    image, text, labels, _ = clustered_world(per_class=10)
    ids = np.arange(len(labels), dtype=np.int64)
    result = PassResult(ids=np.concatenate([ids, ids + 1000]), similarity=None, poison=None,
                        counts=[len(ids), len(ids)], keys=None, seconds=0.0, rank=0,
                        image=image.half(), text=text.half(),
                        digests=neighbours.image_digests(image, neighbours.projection(32, "cpu")))
    args = SimpleNamespace(rank=0, world_size=2, distributed=True, device="cpu", safeclip_neighbour_reference=10**6,
                           safeclip_score_quantile=0.05)
    signal = neighbours.second_signal(args, result)
    collectives._HOST_GROUPS.clear()
    assert signal["reference"] == 2 * len(ids) and len(signal["flagged"]) == 2 * len(ids)
    assert signal["columns"]["copy"].all(), "the other rank's rows are copies of this rank's"
    assert all(call[1] == "gloo" for call in fake.calls if call[0] != "new_group")
    assert signal["seconds"] >= 0


@pytest.mark.parametrize("bad, message", [
    (["--safeclip-score-quantile", "1"], "--safeclip-score-quantile must be in [0, 1)"),
    (["--safeclip-neighbour-reference", "1"], "--safeclip-neighbour-reference must be at least 2"),
    (["--safeclip-score", "knn"], "invalid choice: 'knn'"),
    (["--safeclip-score", "neighbours", "--safeclip-sim-views", "augmented"], "needs --safeclip-sim-views plain"),
    (["--safeclip-score", "mixture", "--safeclip-rank-similarity", "relative"],
     "--safeclip-rank-similarity relative needs --safeclip-score neighbours"),
    (["--safeclip-rank-similarity", "cosine"], "invalid choice: 'cosine'"),
])
def test_bad_second_signal_flags(world, capsys, bad, message):
    from open_clip_safe import params

    with pytest.raises(SystemExit):
        params.parse_args(["--train-data", world["splits"]["train"]["shards"], "--workers", "1", "--safeclip",
                           "--epochs", "9", *bad])
    assert message in capsys.readouterr().err


def test_the_first_split_ranks_the_raw_similarity_and_later_ones_the_relative():
    from open_clip_safe.train import ranked_similarity

    schedule = SafeclipSchedule(rule=SplitRule(), inmodal_epochs=1, crossmodal_epochs=1, epochs=6, num_samples=4,
                                steps_per_epoch=1, steps_for=lambda n: 1, inmodal_lr=1e-4, cross_lr=1e-3,
                                filter_lr=1e-3, warmup=0)
    result = SimpleNamespace(similarity=np.array([0.4, 0.3, 0.2, 0.1], np.float32))
    relative = np.array([-0.3, 0.1, 0.0, 0.2], np.float32)
    signal = {"columns": {"relative_similarity": relative}}
    for rank_similarity, epoch, expected in (("relative", 2, result.similarity), ("relative", 3, relative),
                                             ("relative", 5, relative), ("raw", 3, result.similarity)):
        args = SimpleNamespace(safeclip_rank_similarity=rank_similarity)
        assert ranked_similarity(args, schedule, epoch, result, signal) is expected
