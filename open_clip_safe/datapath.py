"""What the data path costs per data-loader worker core at the size users train (`bench --data-path`).

At 32 px the authors' blur has a kernel of 3 and costs nothing; at 224 px it has 21 and dominated a worker
(docs/benchmark.md#the-data-path-at-224-px). So this times each stream a GPU run reads, on webdataset
shards of synthetic 400 x 300 JPEGs with caption-length text, each through the real loaders with
`workers` workers and no model: open_clip's training view, SafeCLIP's two views (the workers' part under
--safeclip-augment-on device, and everything in the workers), the similarity pass's views, and, apart,
EDA on one core and the views' device part on the device.
"""
import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

CAPTION_WORDS = ("a photo of the old red car parked near a small wooden house by the quiet river at night "
                 "with bright lights and tall green trees behind it").split()


def synthetic_shards(out, num_samples, num_shards, seed=0, size=(400, 300)):
    """Shards of smooth-gradient JPEGs with noise (compressing like photos, not like flat colour) and
    captions of 8-16 words; returns the brace pattern open_clip reads."""
    import webdataset as wds
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    sizes = {}
    per_shard = -(-num_samples // num_shards)
    for shard in range(num_shards):
        name = f"{shard:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            count = 0
            for index in range(shard * per_shard, min(num_samples, (shard + 1) * per_shard)):
                a, b, c = rng.uniform(-1, 1, 3)
                base = np.stack([128 + 100 * np.sin(a * x / 40 + b * y / 50 + k) for k in (0, 2, 4)], -1)
                pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                words = rng.choice(CAPTION_WORDS, rng.integers(8, 17))
                sink.write({"__key__": f"s{index:08d}", "jpg": buffer.getvalue(), "txt": " ".join(words)})
                count += 1
        sizes[name] = count
    (out / "sizes.json").write_text(json.dumps(sizes))
    return str(out / f"{{000000..{num_shards - 1:06d}}}.tar"), sum(sizes.values())


def samples_per_second(loader):
    """Samples a second from the first batch on: worker start-up and the shuffle buffer's fill excluded."""
    start, samples = None, 0
    for batch in loader:
        if start is None:
            start = time.perf_counter()
            continue
        samples += len(batch[0])  # every stream's batch leads with one row a sample
    seconds = time.perf_counter() - start if start is not None else 0.0
    return samples / seconds if seconds > 0 else float("nan")


def eda_rate(num_captions=2000, seed=0):
    """Captions a second of EDA on this core."""
    import random

    from open_clip_safe.augment import EdaAugmenter

    eda = EdaAugmenter()
    rng = np.random.default_rng(seed)
    captions = [" ".join(rng.choice(CAPTION_WORDS, rng.integers(8, 17))) for _ in range(num_captions)]
    for caption in captions[:50]:  # fill the synonym cache as a long-running worker has it
        eda(caption, random.Random(caption))
    start = time.perf_counter()
    for index, caption in enumerate(captions):
        eda(caption, random.Random(index))
    return num_captions / (time.perf_counter() - start)


def device_part_rate(image_size, batch_size, device, repeats=5):
    """Samples a second of the views' device part (photometric.Photometric) on `device`, both views of a
    batch at once as the training step does, timed after one warm-up batch."""
    import torch

    from open_clip_safe.augment import blur_kernel_size
    from open_clip_safe.photometric import Photometric

    photometric = Photometric((0.5,) * 3, (0.5,) * 3, blur_kernel_size(image_size))
    images = torch.randint(0, 256, (2 * batch_size, 3, image_size, image_size), dtype=torch.uint8).to(device)
    cuda = str(device).startswith("cuda")
    photometric(images)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        photometric(images)
    if cuda:
        torch.cuda.synchronize()
    return repeats * batch_size / (time.perf_counter() - start)  # samples (two views each) a second


def measure(out, image_size=224, workers=1, num_samples=2000, batch_size=64, device="cpu", seed=0, text_aug="eda"):
    """Rows of the data-path table: (what, samples/s in all, per worker core or None)."""
    import open_clip
    from open_clip_train.data import SharedEpoch, get_wds_dataset

    from open_clip_safe.augment import EdaAugmenter, image_views_like
    from open_clip_safe.data import TwoViews, wds_pass_loader, wds_train_loader

    shards = max(workers, 4)
    train_data, count = synthetic_shards(Path(out) / "jpeg_shards", num_samples, shards, seed)
    train_preprocess = open_clip.image_transform(image_size, is_train=True)
    eval_preprocess = open_clip.image_transform(image_size, is_train=False)
    tokenizer = open_clip.get_tokenizer("RN50")
    args = SimpleNamespace(train_data=train_data, workers=workers, world_size=1, batch_size=batch_size, seed=seed,
                           dataset_resampled=False, train_num_samples=None, train_data_upsampling_factors=None,
                           device="cpu")
    eda = EdaAugmenter() if text_aug == "eda" else None
    worker_half, _ = image_views_like(train_preprocess, on_device=True)
    all_in_workers, _ = image_views_like(train_preprocess)

    def safeclip_stream(image_views):
        return wds_train_loader(args, TwoViews(image_views, eda, tokenizer, seed), SharedEpoch(0), count)

    streams = [
        ("open_clip's training view", get_wds_dataset(args, train_preprocess, is_train=True,
                                                      tokenizer=tokenizer).dataloader),
        ("SafeCLIP, two views: the workers' part (--safeclip-augment-on device)", safeclip_stream(worker_half)),
        ("SafeCLIP, two views, all in the workers (--safeclip-augment-on workers)", safeclip_stream(all_in_workers)),
        ("similarity pass, view 1: the workers' part",
         wds_pass_loader(args, TwoViews(worker_half, eda, tokenizer, seed), 2 * batch_size)),
        ("similarity pass, plain views (--safeclip-sim-views plain)",
         wds_pass_loader(args, TwoViews(eval_preprocess, None, tokenizer, seed, eval_preprocess), 2 * batch_size)),
    ]
    rows = []
    for what, loader in streams:
        print(f"data path: {what}", flush=True)
        rate = samples_per_second(loader)
        rows.append({"what": what, "samples_per_s": rate, "per_core": rate / max(1, workers)})
    if eda is not None:
        print("data path: EDA", flush=True)
        rate = eda_rate() / 2
        rows.append({"what": "EDA, two captions a sample (one core, in-process)", "samples_per_s": rate,
                     "per_core": rate})
    print(f"data path: the views' device part on {device}", flush=True)
    rows.append({"what": f"SafeCLIP, two views: the device part (batch {batch_size} on {device})",
                 "samples_per_s": device_part_rate(image_size, batch_size, device), "per_core": None})
    return rows


def table(rows, image_size, workers, feed_rate, hardware):
    """Markdown: each stream's rate, per worker core, against open_clip's, and the cores to feed `feed_rate`."""
    base = rows[0]["per_core"]
    lines = [f"Data path at {image_size} px, {workers} data-loader worker(s); {hardware}", "",
             f"| stream | samples/s | per worker core | vs open_clip per core | worker cores to feed "
             f"{feed_rate:,.0f} samples/s |", "|---|---|---|---|---|"]
    for row in rows:
        core = row["per_core"]
        lines.append(f"| {row['what']} | {row['samples_per_s']:,.0f} | " + (
            f"{core:,.0f} | {core / base:.2f}x | {feed_rate / core:,.1f} |" if core else "(device) | | |"))
    return "\n".join(lines)
