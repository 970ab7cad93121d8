"""The similarity pass sees every sample exactly once across ranks and logs one Parquet row each."""
import os
import socket

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from open_clip_safe import register_model_configs
from open_clip_safe.data import get_safeclip_data
from open_clip_safe.params import parse_args
from open_clip_safe.similarity import similarity_pass, write_log
from open_clip_safe.train import broadcast_mask
from open_clip_safe.world import generate_world


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pass_args(train_data, logs, rank, world_size, extra=()):
    args = parse_args(["--train-data", train_data, "--model", "safeclip-micro", "--device", "cpu",
                       "--batch-size", "16", "--workers", "1", "--logs", str(logs), "--name", "run",
                       "--precision", "fp32", *extra])
    args.rank, args.world_size, args.distributed = rank, world_size, world_size > 1
    return args


def run_pass(rank, world_size, port, train_data, logs, extra, results):
    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    args = pass_args(train_data, logs, rank, world_size, extra)
    torch.manual_seed(0)
    register_model_configs()  # a spawned process: conftest has not run here
    model, _, preprocess = open_clip.create_model_and_transforms("safeclip-micro")
    data = get_safeclip_data(args, preprocess, None, open_clip.get_tokenizer("safeclip-micro"))
    result = similarity_pass(model, data, args, epoch=6)
    safe = result.similarity > np.median(result.similarity) if rank == 0 else None  # rank 0 alone splits
    safe = broadcast_mask(args, safe, result.num_samples)
    write_log(args, result, {"clean_prob": result.similarity} if rank == 0 else None, safe, epoch=6)
    results[rank] = (len(result.keys), len(result.ids), result.similarity is None)
    if world_size > 1:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def odd_world(tmp_path_factory):
    """250 samples in shards of 64, 64, 64, 58: divides by neither world size nor batch."""
    out = tmp_path_factory.mktemp("odd")
    return generate_world(out, num_train=250, num_test=4, seed=3, shard_size=64, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "csv"])
def test_every_sample_once_across_two_ranks(odd_world, tmp_path, kind):
    train_data = odd_world["splits"]["train"][kind]
    extra = ["--dataset-type", "csv"] if kind == "csv" else []
    results = mp.Manager().dict()
    mp.spawn(run_pass, args=(2, free_port(), train_data, tmp_path / "two", extra, results), nprocs=2)
    local_counts = [results[r][0] for r in (0, 1)]
    assert sum(local_counts) == 250 and min(local_counts) > 0, local_counts
    assert results[0][1] == results[1][1] == 250, "every rank holds the gathered ids"
    assert results[1][2] and not results[0][2], "only rank 0 holds the similarities"

    table = pq.read_table(tmp_path / "two" / "run" / "similarity" / "epoch_006.parquet").to_pandas()
    assert len(table) == 250 and table["key"].is_unique
    expected_keys = {f"train_{i:07d}" for i in range(250)} if kind == "shards" else {str(i) for i in range(250)}
    assert set(table["key"]) == expected_keys
    assert set(table.columns) == {"key", "similarity", "clean_prob", "safe", "epoch"}
    assert (table["epoch"] == 6).all() and table["safe"].sum() == 125
    assert not os.path.exists(tmp_path / "two" / "run" / "similarity" / ".parts-epoch_006")

    # the same pass in one process gives the same similarity for every key
    run_pass(0, 1, None, train_data, tmp_path / "one", extra, {})
    single = pq.read_table(tmp_path / "one" / "run" / "similarity" / "epoch_006.parquet").to_pandas()
    merged = table.merge(single, on="key", suffixes=("_two", "_one"))
    assert len(merged) == 250
    np.testing.assert_allclose(merged["similarity_two"], merged["similarity_one"], atol=1e-5)


def test_poisoned_column_from_sample_json(tmp_path):
    import json
    import webdataset as wds
    from open_clip_safe.files import png_bytes
    from open_clip_safe.world import draw_sample
    os.makedirs(tmp_path / "p")
    with wds.TarWriter(str(tmp_path / "p" / "000000.tar")) as sink:
        for i in range(40):
            image, caption, meta = draw_sample(0, "train", i)
            sink.write({"__key__": f"s{i:03d}", "png": png_bytes(image), "txt": caption,
                        "json": json.dumps({**meta, "poisoned": i % 10 == 0})})
    (tmp_path / "p" / "sizes.json").write_text(json.dumps({"000000.tar": 40}))
    run_pass(0, 1, None, str(tmp_path / "p" / "000000.tar"), tmp_path / "logs", [], {})
    table = pq.read_table(tmp_path / "logs" / "run" / "similarity" / "epoch_006.parquet").to_pandas()
    assert table["poisoned"].sum() == 4
    assert set(table.loc[table["poisoned"], "key"]) == {"s000", "s010", "s020", "s030"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "csv"])
def test_plain_pass_views_score_each_image_with_its_own_caption(odd_world, tmp_path, kind):
    """--safeclip-sim-views plain: eval preprocess + raw caption, whatever the training views do."""
    from open_clip_safe.augment import image_augment_like
    from open_clip_safe.world import draw_sample

    extra = ["--dataset-type", "csv"] if kind == "csv" else []
    args = pass_args(odd_world["splits"]["train"][kind], tmp_path, 0, 1, extra)
    torch.manual_seed(0)
    model, train_preprocess, eval_preprocess = open_clip.create_model_and_transforms("safeclip-micro")
    tokenizer = open_clip.get_tokenizer("safeclip-micro")
    views = image_augment_like(train_preprocess), lambda caption, rng: "a caption that names nothing"
    plain = [similarity_pass(model, get_safeclip_data(args, *views, tokenizer, pass_image=eval_preprocess), args, 0)
             for _ in range(2)]
    augmented = similarity_pass(model, get_safeclip_data(args, *views, tokenizer), args, 0)
    np.testing.assert_array_equal(plain[0].similarity, plain[1].similarity)
    assert not np.allclose(plain[0].similarity, augmented.similarity, atol=1e-3)

    by_key = dict(zip(plain[0].keys.to_pylist(), plain[0].similarity))
    model.eval()
    for index in (0, 63, 249):
        image, caption, _ = draw_sample(3, "train", index)
        with torch.no_grad():
            image_features = model.encode_image(eval_preprocess(image)[None], normalize=True)
            text_features = model.encode_text(tokenizer([caption]), normalize=True)
        key = f"train_{index:07d}" if kind == "shards" else str(index)
        assert by_key[key] == pytest.approx((image_features @ text_features.T).item(), abs=1e-5)
