"""SafeCLIP's schedule: phases, split rules, the safe fraction, state round trip, learning-rate plan."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from open_clip_safe.schedule import (LrPlan, SafeclipSchedule, SplitRule, gmm_clean_probability,
                                     phase_of, top_fraction_mask)


def full_batches(global_batch):
    """Steps of a sub-epoch over `count` samples when only full global batches are trained."""
    return lambda count: count // global_batch


def planted(n, risky_share=0.05, seed=0):
    """Similarities of clean (N(0.6, 0.05)) and risky (N(0.1, 0.05)) samples, and which are risky."""
    rng = np.random.default_rng(seed)
    risky = rng.random(n) < risky_share
    similarity = np.where(risky, rng.normal(0.1, 0.05, n), rng.normal(0.6, 0.05, n)).astype(np.float32)
    return similarity, risky


def make_schedule(method="gmm", epochs=10, num_samples=1000, **rule):
    return SafeclipSchedule(rule=SplitRule(method, **rule), inmodal_epochs=2, crossmodal_epochs=1, epochs=epochs,
                            num_samples=num_samples, steps_per_epoch=10, steps_for=full_batches(100),
                            inmodal_lr=1e-3, cross_lr=5e-4, filter_lr=1e-5, warmup=4)


def test_phases_count_epochs_from_zero():
    assert [phase_of(epoch, 5, 1) for epoch in range(8)] == ["inmodal"] * 5 + ["crossmodal", "mixed", "mixed"]
    assert phase_of(0, 0, 0) == "mixed"
    assert [make_schedule().phase(epoch) for epoch in (1, 2, 3)] == ["inmodal", "crossmodal", "mixed"]


def test_gmm_finds_planted_risky_samples():
    similarity, risky = planted(20_000)
    clean_prob = gmm_clean_probability(similarity)
    flagged = clean_prob < 0.5
    assert (flagged & risky).sum() / flagged.sum() > 0.99  # precision
    assert (flagged & risky).sum() / risky.sum() > 0.99  # recall


def test_gmm_fits_on_a_subset_and_scores_every_sample():
    """What keeps 10M similarities in seconds (docs/benchmark.md#scale-2026-11-24): the fit sees at most
    max_fit_samples."""
    similarity, risky = planted(200_000)
    clean_prob = gmm_clean_probability(similarity, max_fit_samples=2_000)
    assert clean_prob.shape == similarity.shape and clean_prob.dtype == np.float32
    assert ((clean_prob < 0.5) == risky).mean() > 0.999


def test_top_fraction_breaks_ties_by_index():
    score = np.array([0.5, 0.9, 0.5, 0.5, 0.1])
    assert top_fraction_mask(score, 0.4).tolist() == [True, True, False, False, False]
    assert top_fraction_mask(score, 0.6).tolist() == [True, True, True, False, False]
    assert top_fraction_mask(score, 0.0).sum() == 0


def test_saturated_clean_probabilities_are_ranked_by_similarity():
    clean_prob = np.array([1.0, 1.0, 1.0, 0.2], dtype=np.float32)
    similarity = np.array([0.5, 0.9, 0.7, 0.95], dtype=np.float32)
    assert top_fraction_mask(clean_prob, 0.5, tiebreak=similarity).tolist() == [False, True, True, False]


def test_first_gmm_split_uses_the_threshold_then_fraction_grows_to_the_cap():
    similarity, risky = planted(1000)
    schedule = make_schedule(epochs=30, fraction_step=0.05, fraction_max=0.97)
    safe, clean_prob = schedule.split(3, similarity)[:2]
    np.testing.assert_array_equal(safe, clean_prob >= 0.9)
    assert not (safe & risky).any()
    first = schedule.fraction
    assert first == safe.mean() and 0.9 < first < 0.96
    fractions = []
    for epoch in range(4, 10):
        safe = schedule.split(epoch, similarity).safe
        fractions.append(schedule.fraction)
        assert safe.sum() == round(schedule.fraction * 1000)
        assert similarity[safe].min() >= similarity[~safe].max()  # saturated clean probabilities: by similarity
    expected = [min(0.97, first + 0.05 * m) for m in range(1, 7)]
    np.testing.assert_allclose(fractions, expected)
    assert fractions[-1] == 0.97


def test_ranks_that_receive_the_split_reach_the_same_state_and_plan():
    similarity, _ = planted(1000)
    rank0, rank1 = make_schedule(), make_schedule()
    for epoch in (3, 4, 5):
        safe = rank0.split(epoch, similarity).safe
        rank1.accept_split(epoch, safe)
        rank0.accept_split(epoch, safe)  # idempotent: every rank may accept the broadcast split
        assert rank1.state_dict() == rank0.state_dict() and rank1.plan == rank0.plan
    assert rank1.plan.lr(5, "safe", 0) == rank0.plan.lr(5, "safe", 0)


def test_update_freq_grows_the_fraction_every_k_mixed_epochs():
    rule = SplitRule("topk", fraction_start=0.15, fraction_step=0.01, update_freq=2)
    np.testing.assert_allclose([rule.fraction_at(m, 0.15) for m in range(5)], [0.15, 0.15, 0.16, 0.16, 0.17])


def test_topk_ranks_by_raw_similarity():
    similarity, _ = planted(1000)
    schedule = make_schedule("topk")
    safe, score = schedule.split(3, similarity)[:2]
    assert safe.sum() == 150 and score is not None
    assert similarity[safe].min() >= similarity[~safe].max()
    safe = schedule.split(4, similarity).safe
    assert safe.sum() == 160


def test_warmup_epochs_refuse_a_split():
    with pytest.raises(ValueError, match="warm-up epoch"):
        make_schedule().split(2, np.zeros(10))


def test_state_round_trips_through_json_and_continues_exactly():
    similarity, _ = planted(1000)
    run = make_schedule(epochs=12)
    for epoch in (3, 4):
        run.split(epoch, similarity)
    state = json.loads(json.dumps(run.state_dict()))  # plain types only
    resumed = make_schedule(epochs=12)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == run.state_dict()
    assert resumed.plan == run.plan
    for epoch in (5, 6):
        np.testing.assert_array_equal(resumed.split(epoch, similarity)[0], run.split(epoch, similarity)[0])
        assert resumed.fraction == run.fraction
    with pytest.raises(ValueError, match="--epochs saved 12, now 13"):
        make_schedule(epochs=13).load_state_dict(state)
    with pytest.raises(RuntimeError, match="no first split"):
        make_schedule(epochs=12).split(5, similarity)


def test_warmup_lr_plan_boundaries():
    plan = LrPlan(inmodal_lr=1e-3, cross_lr=5e-4, filter_lr=1e-5, warmup=4, inmodal_epochs=2, crossmodal_epochs=1,
                  steps_per_epoch=10)
    assert plan.lr(0, "inmodal", 0) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 4)  # linear warm-up, step 1 of 4
    assert plan.lr(0, "inmodal", 3) == pytest.approx(1e-3)  # warm-up done: cosine starts at inmodal_lr
    assert plan.lr(1, "inmodal", 2) == plan.warmup_lr(12)
    assert plan.lr(1, "inmodal", 2) == pytest.approx(1e-5 + 0.5 * (1 + math.cos(math.pi * 8 / 16)) * (1e-3 - 1e-5))
    assert plan.lr(1, "inmodal", 9) > 1e-5 and plan.lr(1, "inmodal", 9) < 2e-5  # near filter_lr at the end
    assert all(plan.lr(2, "crossmodal", step) == 1e-5 for step in range(10))
    assert plan.warmup_steps_before(2) == 20


def test_crossmodal_warmup_ramps_from_zero_to_the_filter_lr():
    plan = LrPlan(inmodal_lr=1e-3, cross_lr=5e-4, filter_lr=8e-4, warmup=4, inmodal_epochs=1, crossmodal_epochs=2,
                  steps_per_epoch=10, crossmodal_warmup=4)
    unramped = LrPlan(**{**vars(plan), "crossmodal_warmup": 0})
    assert [plan.lr(0, "inmodal", step) for step in range(10)] == [unramped.lr(0, "inmodal", s) for s in range(10)]
    assert [plan.lr(1, "crossmodal", step) for step in range(5)] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 8e-4])
    assert all(plan.lr(2, "crossmodal", step) == 8e-4 for step in range(10))  # one ramp, not one per epoch
    assert "then 0.0008 after a 4-step ramp from 0" in plan.summary()
    no_inmodal = LrPlan(**{**vars(plan), "inmodal_epochs": 0})
    assert no_inmodal.lr(0, "crossmodal", 1) == pytest.approx(4e-4)


def test_mixed_lr_plan_is_sized_from_the_expected_fractions():
    schedule = make_schedule("topk", epochs=6)  # 3 mixed epochs: safe 150, 160, 170 of 1000
    plan = schedule.plan
    assert plan.mixed_steps == {"safe": [1, 1, 1], "risky": [8, 8, 8]}
    assert plan.sub_epoch_steps_before(5, "risky") == 16
    assert plan.lr(3, "risky", 0) == pytest.approx(1e-3)  # own cosine, from inmodal_lr
    assert plan.lr(3, "safe", 0) == pytest.approx(5e-4)  # own cosine, from cross_lr
    assert plan.lr(4, "risky", 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 12 / 24)) * 1e-3)
    assert plan.lr(5, "risky", 7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 23 / 24)) * 1e-3)
    assert "mixed risky: cosine from 0.001 over 24 steps" in plan.summary()


def test_gmm_plan_is_sized_at_the_first_split():
    schedule = make_schedule(epochs=5)
    with pytest.raises(RuntimeError, match="first split"):
        schedule.plan.lr(3, "safe", 0)
    assert "sized at the first split" in schedule.plan.summary()
    similarity, _ = planted(1000)
    schedule.split(3, similarity)
    safe = round(schedule.fraction * 1000)
    assert schedule.plan.mixed_steps["safe"][0] == safe // 100
    assert schedule.plan.mixed_steps["risky"][0] == (1000 - safe) // 100


def test_mixed_epochs_are_sized_from_the_samples_the_pass_saw(caplog):
    """sizes.json said 1000, the pass saw 900 (say 100 unreadable): the plan follows the pass."""
    from open_clip_safe.train import check_sample_count

    schedule = make_schedule(epochs=5)
    similarity, _ = planted(900)
    safe = schedule.split(3, similarity).safe
    assert schedule.samples_seen == 900 and len(safe) == 900
    assert sum(schedule.expected_counts()[0]) == 900
    assert schedule.plan.mixed_steps["risky"][0] == (900 - int(safe.sum())) // 100
    resumed = make_schedule(epochs=5)
    resumed.load_state_dict(json.loads(json.dumps(schedule.state_dict())))
    assert resumed.samples_seen == 900 and resumed.plan.mixed_steps == schedule.plan.mixed_steps
    args = SimpleNamespace(batch_size=32, world_size=2)
    check_sample_count(args, 1000, 990)
    assert "similarity pass saw" not in caplog.text, "within a global batch: no warning"
    check_sample_count(args, 1000, 900)
    assert "the similarity pass saw 900 samples, but the run was sized for 1000" in caplog.text


def test_from_args_reads_the_flags():
    args = SimpleNamespace(safeclip_split="topk", safeclip_first_split_threshold=0.9, safeclip_safe_fraction_start=0.2,
                           safeclip_safe_fraction_step=0.01, safeclip_safe_fraction_max=0.85, safeclip_update_freq=1,
                           safeclip_safe_fraction_auto_share=0.5,
                           safeclip_inmodal_epochs=1, safeclip_crossmodal_epochs=1, epochs=3, safeclip_inmodal_lr="lr",
                           lr=5e-4, safeclip_filter_lr=5e-6, warmup=0, safeclip_crossmodal_warmup=3)
    data = SimpleNamespace(num_samples=1000, dataloader=SimpleNamespace(num_batches=7), batches_for=full_batches(50))
    plan = SafeclipSchedule.from_args(args, data).plan
    assert plan.inmodal_lr == plan.cross_lr == 5e-4 and plan.steps_per_epoch == 7 and plan.crossmodal_warmup == 3
    assert plan.mixed_steps == {"safe": [4], "risky": [16]}


@pytest.mark.parametrize("steps_per_epoch, crossmodal_epochs, lr, filter_lr, ramp", [
    (3906, 1, 5e-4, 5e-6, 0),  # the authors' CC1M epoch: their rate, no ramp
    (11_719, 1, 5e-4, 5e-6, 0),  # CC3M at batch 256: never below their rate
    (31, 2, 1e-3, 5e-6 * 3906 / 62, 31),  # the demo's 62-step warm-up: raised, with a ramp over half of it
    (5, 1, 1e-3, 1e-3, 2),  # at most --lr
])
def test_auto_filter_lr_moves_the_weights_as_far_as_the_authors_warm_up(caplog, steps_per_epoch, crossmodal_epochs,
                                                                        lr, filter_lr, ramp):
    import logging

    caplog.set_level(logging.INFO)
    args = SimpleNamespace(safeclip_split="gmm", safeclip_first_split_threshold=0.9, safeclip_safe_fraction_start=0.15,
                           safeclip_safe_fraction_step=None, safeclip_safe_fraction_max=0.85, safeclip_update_freq=1,
                           safeclip_safe_fraction_auto_share=0.5, safeclip_inmodal_epochs=1,
                           safeclip_crossmodal_epochs=crossmodal_epochs, epochs=10, safeclip_inmodal_lr=None, lr=lr,
                           safeclip_filter_lr=None, warmup=0, safeclip_crossmodal_warmup=None)
    data = SimpleNamespace(num_samples=steps_per_epoch * 128, dataloader=SimpleNamespace(num_batches=steps_per_epoch),
                           batches_for=full_batches(128))
    from open_clip_safe.safeclip import SafeclipRun

    SafeclipRun(SimpleNamespace(**vars(args), rank=1), data)
    assert "cross-modal warm-up of" not in caplog.text, "only the master logs"
    plan = SafeclipRun(SimpleNamespace(**vars(args), rank=0), data).plan
    assert plan.filter_lr == pytest.approx(filter_lr) and plan.crossmodal_warmup == ramp
    assert plan.inmodal_lr == pytest.approx(lr / 5), "auto: the authors' CC1M ratio"
    assert (f"cross-modal warm-up of {steps_per_epoch * crossmodal_epochs} steps: --safeclip-filter-lr "
            f"{filter_lr:.3g}, --safeclip-crossmodal-warmup {ramp} (auto") in caplog.text
    inmodal_steps = steps_per_epoch
    assert plan.warmup_lr(inmodal_steps + max(ramp, 1) - 1) == pytest.approx(filter_lr)
    if ramp:
        assert plan.warmup_lr(inmodal_steps) == pytest.approx(filter_lr / ramp)
    given = SafeclipSchedule.from_args(SimpleNamespace(**{**vars(args), "safeclip_filter_lr": 1e-4,
                                                          "safeclip_crossmodal_warmup": 0, "safeclip_inmodal_lr": 3e-4}),
                                       data).plan
    assert (given.filter_lr, given.crossmodal_warmup, given.inmodal_lr) == (1e-4, 0, 3e-4), "given values are kept"


def test_a_first_split_from_a_mixture_that_does_not_separate_falls_back_to_the_start_fraction():
    """One hump of similarities: the "clean" component is its upper half (Ashman's D < 2), so the
    samples over the threshold are no group of their own; the safe set is the top 15% instead."""
    similarity = np.random.default_rng(0).normal(0.4, 0.1, 2000).astype(np.float32)
    schedule = make_schedule(epochs=6)
    split = schedule.split(3, similarity)
    assert split.separation < 2 and "does not separate (Ashman's D" in split.fallback
    assert split.safe.sum() == 300 and schedule.first_fraction == 0.15
    assert similarity[split.safe].min() >= similarity[~split.safe].max()
    separated, _ = planted(2000)
    kept = make_schedule(epochs=6).split(3, separated)
    assert kept.fallback is None and kept.separation > 2 and 0.9 < kept.safe.mean() < 0.96


def test_an_empty_first_split_falls_back_too():
    score = np.linspace(0.1, 0.8, 1000)  # no sample reaches 0.9, though the mixture separated
    safe, reason = SplitRule("gmm", fraction_start=0.15).first_split(score, score, separation=3.0)
    assert reason == "no sample reached clean probability 0.9" and safe.sum() == 150 and safe[-150:].all()
    kept, none = SplitRule("gmm").first_split(np.linspace(0.1, 1.0, 1000), score, separation=3.0)
    assert none is None and kept.sum() == (np.linspace(0.1, 1.0, 1000) >= 0.9).sum()


def test_auto_step_reaches_the_cap_at_the_set_share_of_the_mixed_epochs():
    schedule = make_schedule(epochs=13, fraction_step=None, fraction_max=0.85, auto_share=0.5)  # 10 mixed
    assert schedule.rule.step(0.05, 10) == pytest.approx(0.16)
    fractions = [schedule.fraction_at(m, 0.05) for m in range(10)]
    np.testing.assert_allclose(fractions, [0.05, 0.21, 0.37, 0.53, 0.69, 0.85, 0.85, 0.85, 0.85, 0.85])
    every_two = SplitRule("gmm", fraction_step=None, update_freq=2, auto_share=0.5)
    assert every_two.step(0.05, 10) == pytest.approx(0.8 / 2)  # 5 epochs, updates at 2 and 4
    with pytest.raises(ValueError, match="needs the number of mixed epochs"):
        every_two.fraction_at(3, 0.05)
    whole_run = SplitRule("gmm", fraction_step=None, auto_share=1.0)  # the cap at the last mixed epoch, 9
    assert whole_run.fraction_at(9, 0.05, 10) == pytest.approx(0.85) and whole_run.fraction_at(8, 0.05, 10) < 0.85


def test_the_clip_loss_share_of_a_plan():
    """(cross-modal epochs + safe fractions of the mixed epochs) / epochs."""
    schedule = make_schedule("topk", epochs=10)  # 2 in-modal, 1 cross-modal, 7 mixed from 0.15 by 0.01
    expected = (1 + sum(0.15 + 0.01 * m for m in range(7))) / 10
    assert schedule.clip_loss_share() == pytest.approx(expected)
    assert make_schedule(epochs=10).clip_loss_share(first_fraction=0.15) == pytest.approx(expected)


def test_a_plan_that_starves_the_clip_loss_is_named_at_the_start(caplog):
    from open_clip_safe.safeclip import warn_if_the_clip_loss_starves

    args = SimpleNamespace(safeclip_safe_fraction_start=0.15, epochs=10)
    warn_if_the_clip_loss_starves(args, make_schedule("topk", epochs=10))
    assert "gives the CLIP loss about 23% of the samples plain CLIP would see in 10 epochs" in caplog.text
    assert "--safeclip-safe-fraction-step (or auto)" in caplog.text
    caplog.clear()
    warn_if_the_clip_loss_starves(args, make_schedule("topk", epochs=10, fraction_step=0.2))
    assert caplog.text == ""


def test_a_resume_with_other_settings_names_each_changed_flag_in_one_line():
    saved = make_schedule(epochs=10, fraction_step=None)
    saved.accept_split(3, np.arange(1000) < 300)
    longer = make_schedule(epochs=14, fraction_max=0.9)
    with pytest.raises(ValueError) as refused:
        longer.load_state_dict(saved.state_dict())
    assert str(refused.value) == (
        "SafeCLIP cannot continue a schedule planned with other settings: --safeclip-safe-fraction-step saved auto, "
        "now 0.01; --safeclip-safe-fraction-max saved 0.85, now 0.9; --epochs saved 10, now 14 (resume with the "
        "saved values, or start a new run)")
    same = make_schedule(epochs=10, fraction_step=None)
    same.load_state_dict(saved.state_dict())
    assert same.first_fraction == 0.3


def test_suspects_are_the_lowest_scores_on_the_risky_side_ties_to_the_lower_similarity():
    from open_clip_safe.schedule import Split
    from open_clip_safe.train import suspect_mask

    score = np.array([-2.0, 0.9, -2.0, 0.1, -2.0, 0.5, 0.0, 0.8], dtype=np.float32)  # three flagged, tied at -2
    similarity = np.array([0.30, 0.9, 0.10, 0.2, 0.20, 0.5, 0.15, 0.8], dtype=np.float32)
    safe = np.array([False, True, False, False, False, True, False, True])
    split = Split(safe, score, score, None, None)
    assert np.flatnonzero(suspect_mask(split, similarity, 2 / 8)).tolist() == [2, 4]  # not 0, the first by index
    assert np.flatnonzero(suspect_mask(split, similarity, 5 / 8)).tolist() == [0, 2, 3, 4, 6]
    assert not (suspect_mask(split, similarity, 1.0) & safe).any(), "a sample in the safe set is never pushed"
