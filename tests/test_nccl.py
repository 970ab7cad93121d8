"""SafeCLIP's collectives as an NCCL job sees them, proven without a GPU.

NCCL refuses CPU tensors. Two stand-ins show that SafeCLIP's host arrays never reach the training
group when that group is NCCL: an in-process fake of torch.distributed whose default group refuses
CPU tensors, and a real two-rank gloo run whose default group answers "nccl" to get_backend() with
every collective recorded (tests/run_recording.py). The same two-rank run has node-local log folders
(rank 0 must not read rank 1's files) and a fake wandb that fails on logging before wandb.init.
"""
import json
import os
import re
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, child_env
from open_clip_safe import collectives, similarity, train


class Group:
    def __init__(self, backend):
        self.backend = backend


class FakeNcclDist:
    """torch.distributed as rank 0 of a two-rank NCCL job sees it; the other rank holds the same rows.

    Collectives on the default group refuse CPU tensors, as NCCL does; new_group(backend="gloo")
    gives a group that takes them, in the dtypes gloo carries (no uint16, int16 or uint64)."""

    GLOO_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
                   torch.int32, torch.int64, torch.bool}

    def __init__(self):
        self.calls = []
        self.distributed_c10d = SimpleNamespace(_get_default_group=lambda: "default")

    def get_backend(self, group=None):
        return "nccl" if group is None else group.backend

    def new_group(self, backend=None, **_):
        self.calls.append(("new_group", backend))
        return Group(backend)

    def check(self, op, group, tensors):
        backend = self.get_backend(group)
        self.calls.append((op, backend, sorted({t.device.type for t in tensors})))
        if backend == "nccl" and any(t.device.type == "cpu" for t in tensors):
            raise RuntimeError(f"{op}: NCCL does not support CPU tensors")
        if backend == "gloo" and any(t.dtype not in self.GLOO_DTYPES for t in tensors):
            raise RuntimeError(f"{op}: Invalid scalar type")

    def all_gather(self, parts, tensor, group=None):
        self.check("all_gather", group, [tensor, *parts])
        for part in parts:
            part.copy_(tensor)

    def gather(self, tensor, gather_list=None, dst=0, group=None):
        self.check("gather", group, [tensor, *(gather_list or [])])
        for part in gather_list or []:
            part.copy_(tensor)

    def broadcast(self, tensor, src, group=None):
        self.check("broadcast", group, [tensor])

    def broadcast_object_list(self, objects, src=0, group=None, device=None):
        self.check("broadcast_object_list", group, [torch.zeros(1)])

    def barrier(self, group=None):
        self.check("barrier", group, [])


@pytest.fixture
def nccl(monkeypatch):
    fake = FakeNcclDist()
    monkeypatch.setattr(collectives, "dist", fake)
    monkeypatch.setattr(collectives, "CHUNK", 7)  # many chunks, uneven last ones
    collectives._HOST_GROUPS.clear()
    yield fake
    collectives._HOST_GROUPS.clear()


def rank0(world_size=2):
    return SimpleNamespace(rank=0, world_size=world_size, distributed=True, logs=None)


def test_host_collectives_take_a_gloo_group_under_nccl(nccl):
    args = rank0()
    ids = np.arange(20, dtype=np.int64)
    counts = collectives.all_gather_counts(args, len(ids))
    assert counts == [20, 20]
    np.testing.assert_array_equal(collectives.gather_rows(args, ids, counts), np.concatenate([ids, ids]))
    sims = np.linspace(0, 1, 20, dtype=np.float32)
    np.testing.assert_array_equal(collectives.gather_rows(args, sims, counts, dst=0), np.concatenate([sims, sims]))
    halves = np.linspace(-1, 1, 20, dtype=np.float16)  # the second signal's reference embeddings
    np.testing.assert_array_equal(collectives.gather_rows(args, halves, counts), np.concatenate([halves, halves]))
    words = np.arange(20, dtype=np.uint64) << np.uint64(40)
    np.testing.assert_array_equal(collectives.gather_rows(args, words, counts), np.concatenate([words, words]))
    safe = np.arange(40) % 3 == 0
    np.testing.assert_array_equal(train.broadcast_mask(args, safe, 40), safe)
    assert collectives.gather_bytes_to(args, b"keys") == [b"keys", b"keys"]
    assert collectives.broadcast_object(args, "ok") == "ok"
    assert nccl.calls.count(("new_group", "gloo")) == 1, "one gloo group, made once"
    for call in nccl.calls:
        if call[0] != "new_group":
            assert call[1] == "gloo" and set(call[2]) <= {"cpu"}, call


def test_the_gloo_group_is_made_and_crossed_when_the_run_starts(nccl, monkeypatch):
    """Before any data is read: a gloo network that cannot connect fails in the run's first minute."""
    from open_clip_safe import safeclip

    def first_data(*_, **__):
        raise KeyboardInterrupt  # the first thing get_data does after the host group
    monkeypatch.setattr(safeclip, "open_clip_get_data", first_data)
    with pytest.raises(KeyboardInterrupt):
        safeclip.get_data(SimpleNamespace(**vars(rank0()), safeclip=True, train_data="x"), (None, None))
    assert nccl.calls == [("new_group", "gloo"), ("barrier", "gloo", [])]


def test_the_backend_open_clip_picks_for_cuda_carries_every_safeclip_collective(nccl, monkeypatch):
    """--device cuda without --dist-backend: open_clip starts NCCL; SafeCLIP's host arrays take gloo."""
    from open_clip_train import distributed

    chosen = {}

    def init_process_group(backend=None, **_):
        chosen["backend"] = backend
        raise KeyboardInterrupt  # enough: the backend is chosen

    monkeypatch.setattr(distributed, "is_device_available", lambda device_type: (True, True))
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    with pytest.raises(KeyboardInterrupt):
        distributed.init_distributed_device_so(device="cuda", dist_backend=None)
    assert chosen["backend"] == "nccl"
    assert not collectives.carries_cpu(chosen["backend"])
    assert collectives.carries_cpu("gloo") and collectives.carries_cpu("cpu:gloo,cuda:nccl")
    test_host_collectives_take_a_gloo_group_under_nccl(nccl)  # what SafeCLIP sends then goes to gloo


def test_a_user_backend_that_cannot_carry_the_device_is_one_line(capsys):
    from open_clip_safe import params

    with pytest.raises(SystemExit) as stop:
        params.parse_args(["--train-data", "x.csv", "--device", "cpu", "--dist-backend", "nccl"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "open_clip_safe.main: error: --dist-backend nccl cannot carry the cpu tensors of --device cpu (NCCL takes "
        "CUDA tensors only); use gloo, or omit --dist-backend")


# ---------------------------------------------------------------- two real ranks


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(tmp_path, flags_for_rank, timeout=600, **env):
    """Two processes as torchrun would start them, but each with its own command line (its own --logs)."""
    port = free_port()
    processes = []
    for rank in (0, 1):
        command = [sys.executable, os.path.join(REPO, "tests", "run_recording.py"), str(tmp_path / f"calls{rank}.json"),
                   *flags_for_rank(rank)]
        rank_env = child_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                             **env)
        processes.append(subprocess.Popen(command, cwd=REPO, env=rank_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    return [process.returncode for process in processes], outputs


def flags(train_data, logs, name, epochs=3):
    return ["--train-data", train_data, "--model", "safeclip-micro", "--device", "cpu", "--precision", "fp32",
            "--batch-size", "16", "--epochs", str(epochs), "--workers", "1", "--lr", "1e-3", "--seed", "0",
            "--log-every-n-steps", "4", "--logs", str(logs), "--name", name, "--save-frequency", "1",
            "--safeclip", "--safeclip-inmodal-epochs", "1", "--safeclip-crossmodal-epochs", "0",
            "--safeclip-text-aug", "none", "--safeclip-safe-fraction-step", "0.25",
            "--safeclip-memory-bank-size", "32", "--safeclip-split", "topk", "--safeclip-safe-fraction-start", "0.3"]


@pytest.mark.slow
def test_two_ranks_under_an_nccl_group_with_node_local_logs_and_wandb(poisoned_world, tmp_path):
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    pythonpath = os.pathsep.join([os.path.join(REPO, "tests", "fakes"), os.environ.get("PYTHONPATH", "")])
    codes, outputs = launch_two_ranks(
        tmp_path, lambda rank: flags(poisoned_world["shards"], tmp_path / f"node{rank}", "run")
        + ["--report-to", "wandb", "--safeclip-score", "neighbours", "--safeclip-sim-views", "plain",
           "--safeclip-unlearn-fraction", "0.1"], PYTHONPATH=pythonpath, FAKE_WANDB_DIR=wandb_dir)
    assert codes == [0, 0], "\n".join(output[-3000:] for output in outputs)

    # collectives: SafeCLIP's host arrays on a gloo group of their own, CPU tensors only; the training
    # group (NCCL here) carries only the losses' features, on the training device
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"calls{rank}.json").read_text())
        own = [c for c in calls if c["caller"].startswith("open_clip_safe.") and c["caller"] != "open_clip_safe.loss"]
        assert own and all(c["group"] == "other" and c["backend"] == "gloo" for c in own), own
        assert all(c["devices"] in ([], ["cpu"]) for c in own)
        assert own[0]["op"] == "new_group", "the gloo group is made before SafeCLIP's first host collective"
        first_loss = next(i for i, c in enumerate(calls) if c["caller"].endswith(".loss"))
        assert calls.index(own[0]) < first_loss, "the gloo group is made when the run starts, before training"
        default = [c for c in calls if c["group"] == "default" and c["devices"]]
        assert default and {c["caller"] for c in default} <= {"open_clip.loss", "open_clip_safe.loss",
                                                               "open_clip_train.distributed"}, default

    # node-local logs: rank 0 wrote the whole similarity log without reading rank 1's folder
    for epoch in (1, 2):
        table = pq.read_table(tmp_path / "node0" / "run" / "similarity" / f"epoch_{epoch:03d}.parquet").to_pandas()
        assert len(table) == poisoned_world["num_samples"] and table["key"].is_unique
        assert table["poisoned"].sum() == poisoned_world["num_poisoned"]
        assert set(table["poison_kind"].dropna()) == {"other"}  # the fixture marks poisons without an attack name
        assert {"clean_prob", "score", "copy", "consistency"} <= set(table.columns)  # the second signal's
    assert not (tmp_path / "node1" / "run").exists(), "rank 1 writes no files"

    # progress in a job log: lines, not carriage-return frames
    log = (tmp_path / "node0" / "run" / "out.log").read_text()
    assert "\r" not in outputs[0] and "similarity pass (epoch 1): " in log
    assert re.search(r"SafeCLIP epoch 1: split as a poison detector: ROC AUC [01]\.\d{3}; TPR ", log)
    assert re.search(r"SafeCLIP epoch 2: second signal [\d.]+s against 256 reference samples: flagged \d+", log)
    assert f"SafeCLIP epoch 2: unlearning {round(0.1 * poisoned_world['num_samples'])} suspects" in log

    # wandb: only the master logs, after its wandb.init
    rank0_calls = [json.loads(line) for line in (wandb_dir / "rank0.jsonl").read_text().splitlines()]
    assert rank0_calls[0]["call"] == "init" and any(c["call"] == "log" for c in rank0_calls)
    assert any("train/safe_fraction" in c.get("keys", ()) for c in rank0_calls)
    assert not (wandb_dir / "rank1.jsonl").exists(), "rank 1 never calls wandb"


@pytest.mark.slow
def test_a_failed_similarity_log_write_stops_every_rank_with_its_error(poisoned_world, tmp_path):
    (tmp_path / "node0" / "run").mkdir(parents=True)
    (tmp_path / "node0" / "run" / "similarity").write_text("a file where the log folder should be")
    codes, outputs = launch_two_ranks(
        tmp_path, lambda rank: flags(poisoned_world["shards"], tmp_path / f"node{rank}", "run", epochs=2), timeout=300)
    assert codes[0] != 0 and codes[1] != 0, outputs
    assert "similarity" in outputs[0].splitlines()[-1]
    assert "rank 0 could not write the similarity log" in outputs[1] and "FileExistsError" in outputs[1]


def test_write_log_keys_arrive_from_every_rank(nccl, tmp_path):
    """Rank 0 writes rows from its arrays and keys sent by the other rank (mirrored here), in chunks."""
    args = SimpleNamespace(rank=0, world_size=2, distributed=True, logs=str(tmp_path), name="run")
    keys = pa.array([f"k{i}" for i in range(10)])
    result = similarity.PassResult(ids=None, similarity=np.arange(20, dtype=np.float32),
                                   poison=np.array([0, 1, 2, 3, -1] * 4, dtype=np.int8), counts=[10, 10], keys=keys,
                                   seconds=0.0)
    similarity.KEY_CHUNK, chunk = 3, similarity.KEY_CHUNK
    try:
        path = similarity.write_log(args, result, {"clean_prob": np.ones(20, np.float32)}, np.arange(20) < 5, epoch=4)
    finally:
        similarity.KEY_CHUNK = chunk
    table = pq.read_table(path).to_pandas().sort_values("similarity")
    assert table["key"].tolist() == [f"k{i}" for i in range(10)] * 2
    assert table["safe"].sum() == 5 and (table["epoch"] == 4).all()
    kinds = table["poison_kind"].astype(object)
    assert [None if isinstance(k, float) else k for k in kinds[:5]] == [None, "backdoor", "targeted", "other", None]
    assert table["poisoned"].tolist()[:5] == [False, True, True, True, False]
