"""--safeclip-fast: splits after the first from the training steps' cosines, gathered by sample id.

Through two real ranks and a resume: test_safeclip_e2e.test_two_processes_through_all_phases_in_fast_mode."""
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from open_clip_safe import diagnostics, params, similarity
from open_clip_safe.cli import UsageError
from open_clip_safe.training_scores import TrainingScores, pair_cosines
from test_nccl import nccl  # noqa: F401  (the fixture)


def pass_result(ids, similarity_values, rank=0):
    return similarity.PassResult(ids=np.asarray(ids, np.int64), similarity=np.asarray(similarity_values, np.float32),
                                 poison=np.zeros(len(ids), np.int8), counts=[len(ids)], keys=None, seconds=1.0,
                                 rank=rank, image=torch.zeros(len(ids), 4), text=torch.zeros(len(ids), 4),
                                 digests=np.zeros(len(ids), np.int64))


def single():
    return SimpleNamespace(rank=0, world_size=1, distributed=False)


def test_pair_cosines_average_the_views_and_take_one_view_alone():
    a, b, c, d = (F.normalize(torch.randn(5, 8), dim=-1) for _ in range(4))
    one = F.cosine_similarity(a, c)
    torch.testing.assert_close(pair_cosines(a, a, c, c), one)
    torch.testing.assert_close(pair_cosines(a, b, c, d), (one + F.cosine_similarity(b, d)) / 2)


def test_collect_writes_each_cosine_into_its_samples_row_and_keeps_the_rest():
    ids = np.array([907, 13, 4_000_000_000_000, 55, 2, 71])  # the pass's rank-major order, not sorted
    scores = TrainingScores(pass_result(ids, np.arange(6) / 10), rank=0)
    scores.record(torch.tensor([55, 907]), torch.tensor([0.9, 0.8]))
    scores.record(np.array([4_000_000_000_000, 12345]), torch.tensor([0.7, 0.6]))  # 12345: not in the pass
    result = scores.collect(single())
    np.testing.assert_allclose(result.similarity, [0.8, 0.1, 0.7, 0.9, 0.4, 0.5])
    assert (result.source, result.refreshed, result.unknown) == ("training", 3, 1)
    assert result.image is None and result.digests is None  # the pass's embeddings are not kept
    np.testing.assert_array_equal(result.ids, ids)
    again = scores.collect(single())  # nothing recorded since: every score kept
    np.testing.assert_allclose(again.similarity, [0.8, 0.1, 0.7, 0.9, 0.4, 0.5])
    assert again.refreshed == 0


def test_collect_gathers_on_the_host_group_under_nccl(nccl):  # noqa: F811
    """The cosines leave the device before the gather: under NCCL the default group never sees them."""
    args = SimpleNamespace(rank=0, world_size=2, distributed=True)
    ids = np.arange(10, dtype=np.int64) * 7
    scores = TrainingScores(pass_result(ids, np.zeros(10)), rank=0)
    scores.record(torch.tensor([14, 63]), torch.tensor([0.5, -0.25]))
    result = scores.collect(args)  # the fake's other rank sends the same rows
    assert result.similarity[2] == 0.5 and result.similarity[9] == -0.25 and result.refreshed == 2
    assert {call[1] for call in nccl.calls if call[0] != "new_group"} == {"gloo"}


def test_fast_mode_refuses_the_second_signal():
    base = ["--train-data", "x.tar", "--safeclip", "--safeclip-fast", "--safeclip-score", "neighbours",
            "--safeclip-sim-views", "plain"]
    args = params.parse_open_clip_args(base[:2])
    parser = params.safeclip_parser()
    known, _ = parser.parse_known_args(base[2:])
    for name, value in vars(known).items():
        setattr(args, name, value)
    with pytest.raises(UsageError, match="--safeclip-fast cannot take --safeclip-score neighbours"):
        params.check_safeclip_args(args, parser.parse_args([]))


def test_diagnostics_name_the_source_of_each_epochs_similarity(tmp_path):
    for epoch, source in ((2, None), (3, "training")):  # None: a log written before fast mode existed
        table = pa.table({"similarity": pa.array([0.1, 0.5, 0.6], pa.float32()),
                          "clean_prob": pa.array([0.0, 0.9, 1.0], pa.float32()), "safe": [False, True, True],
                          "epoch": pa.array([epoch] * 3, pa.int32()), "poisoned": [True, False, False]})
        if source:
            table = table.replace_schema_metadata({similarity.SOURCE_KEY: source})
        (tmp_path / "similarity").mkdir(exist_ok=True)
        pq.write_table(table, tmp_path / "similarity" / f"epoch_{epoch:03d}.parquet")
    rows, _ = diagnostics.split_diagnostics(tmp_path)
    assert [row["source"] for row in rows] == ["pass", "training"]
    lines = diagnostics.diagnostics_table(rows).splitlines()
    assert lines[0].split()[:2] == ["epoch", "similarity"]
    assert lines[1].split()[:2] == ["2", "pass"] and lines[2].split()[:2] == ["3", "training"]
