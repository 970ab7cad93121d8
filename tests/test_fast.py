"""--safeclip-fast: splits after the first from the training steps' cosines, gathered by sample id."""
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from conftest import run_module
from open_clip_safe import diagnostics, params, similarity
from open_clip_safe.cli import UsageError
from open_clip_safe.training_scores import TrainingScores, pair_cosines
from test_nccl import flags as nccl_flags, launch_two_ranks, nccl  # noqa: F401  (nccl: the fixture)


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


def source_of(path):
    return pq.read_schema(path).metadata[similarity.SOURCE_KEY.encode()].decode()


@pytest.mark.slow
def test_two_ranks_split_from_training_steps_and_a_resume_takes_a_real_pass(poisoned_world, tmp_path):
    """Two ranks (the default group answering "nccl", every collective recorded), 1 warm-up + 3 mixed
    epochs: the first split from a pass, the next two from the training steps, on the host group."""
    codes, outputs = launch_two_ranks(
        tmp_path, lambda rank: nccl_flags(poisoned_world["shards"], tmp_path / f"node{rank}", "fast", epochs=4)
        + ["--safeclip-fast"])
    assert codes == [0, 0], "\n".join(output[-3000:] for output in outputs)
    run = tmp_path / "node0" / "fast"
    log = (run / "out.log").read_text()
    n = poisoned_world["num_samples"]
    assert re.search(rf"SafeCLIP epoch 1: similarity pass [\d.]+s over {n} samples", log)
    assert "similarity pass (epoch 2)" not in log and "similarity pass (epoch 3)" not in log
    for epoch in (2, 3):
        refreshed = int(re.search(rf"SafeCLIP epoch {epoch}: similarities from the last epoch's training steps "
                                  rf"\(--safeclip-fast; (\d+) of {n} refreshed", log).group(1))
        assert n - 2 * 32 < refreshed <= n  # all but each sub-epoch's remainder of a global batch (2 x 16)
    tables = {e: pq.read_table(run / "similarity" / f"epoch_{e:03d}.parquet").to_pandas().set_index("key")
              for e in (1, 2, 3)}
    assert [source_of(run / "similarity" / f"epoch_{e:03d}.parquet") for e in (1, 2, 3)] == ["pass", "training",
                                                                                            "training"]
    for epoch in (2, 3):
        table = tables[epoch].loc[tables[1].index]
        assert len(table) == n and table["poisoned"].equals(tables[1]["poisoned"])  # rows stay with their keys
        assert (table["similarity"] != tables[epoch - 1].loc[tables[1].index]["similarity"]).sum() > n // 2
        assert "Train Epoch: %d risky" % epoch in log and "Train Epoch: %d safe" % epoch in log
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"calls{rank}.json").read_text())
        own = [c for c in calls if c["caller"] == "open_clip_safe.collectives"]
        assert own and all(c["backend"] == "gloo" and c["devices"] in ([], ["cpu"]) for c in own)
    table = diagnostics.diagnostics_table(diagnostics.split_diagnostics(run)[0])
    assert [line.split()[1] for line in table.splitlines()[1:]] == ["pass", "training", "training"]

    # resumed after epoch 3 of 4 (the second mixed epoch): the next split comes from a real pass
    (tmp_path / "resumed").mkdir()
    for folder in ("checkpoints", "safeclip_state"):
        (tmp_path / "resumed" / "fast" / folder).mkdir(parents=True)
        shutil.copy(run / folder / "epoch_3.pt", tmp_path / "resumed" / "fast" / folder / "epoch_3.pt")
    resumed = run_module("open_clip_safe.main", *nccl_flags(poisoned_world["shards"], tmp_path / "resumed", "fast",
                                                            epochs=4), "--safeclip-fast", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (tmp_path / "resumed" / "fast" / "out.log").read_text()
    assert re.search(rf"SafeCLIP epoch 3: similarity pass [\d.]+s over {n} samples", log)
    assert source_of(tmp_path / "resumed" / "fast" / "similarity" / "epoch_003.parquet") == "pass"
