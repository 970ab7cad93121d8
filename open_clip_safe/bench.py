"""`python -m open_clip_safe.bench`: what SafeCLIP costs against plain open_clip, per phase and per run.

Runs `open_clip_safe.main` twice on the same data, model and batch size, each in its own process:
plain open_clip for E epochs, then SafeCLIP for E epochs (one in-modal warm-up epoch, one
cross-modal epoch, then mixed epochs at growing safe fractions). Inside each run the seams are
wrapped with timers, so the figures are the training loop's wall time (data loading included,
process start and model creation excluded): samples/s per phase, the similarity pass, the
SafeCLIP/open_clip ratio per phase and for the whole run, and peak memory.
"""
import json
import resource
import sys
import time
from pathlib import Path

from open_clip_safe.cli import Parser, add_device_flags, guarded, resolve_precision


# ---------------------------------------------------------------- inside one timed run


class CudaPeak:
    """The device's peak allocation since the last reset, in MiB."""

    def __init__(self):
        import torch

        self.torch = torch

    def sync(self):
        self.torch.cuda.synchronize()

    def read(self):
        return self.torch.cuda.max_memory_allocated() / 2**20

    def reset(self):
        self.torch.cuda.reset_peak_memory_stats()


class ProcessPeak:
    """The process's running peak resident memory in MiB (it cannot be reset)."""

    def sync(self):
        pass

    def read(self):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def reset(self):
        pass


class PhaseTimer:
    """Wall time, samples and peak memory of every timed call, in call order.

    Calls nest (a mixed epoch holds its pass and sub-epochs): each call resets the peak for its own
    figure, so an enclosing call keeps the largest peak of what it held as its own running maximum."""

    def __init__(self, device, peak=None):
        self.peak = peak or (CudaPeak() if device.startswith("cuda") else ProcessPeak())
        self.records = []
        self.open_peaks = []  # per call in progress, the largest peak seen before its last inner reset

    def wrap(self, function, phase_of, samples_of):
        def timed(*args, **kwargs):
            self.peak.sync()
            if self.open_peaks:
                self.open_peaks[-1] = max(self.open_peaks[-1], self.peak.read())
            self.peak.reset()
            self.open_peaks.append(0.0)
            start = time.perf_counter()
            try:
                result = function(*args, **kwargs)
                self.peak.sync()
                seconds = time.perf_counter() - start
            finally:
                peak = max(self.open_peaks.pop(), self.peak.read())
                if self.open_peaks:
                    self.open_peaks[-1] = max(self.open_peaks[-1], peak)
            self.records.append({"phase": phase_of(*args, **kwargs), "seconds": seconds,
                                 "samples": samples_of(result, *args, **kwargs), "peak_memory_mib": peak})
            return result
        return timed


def timed_run(report_path, argv):
    """open_clip_safe.main(argv) with timers around the epoch, sub-epoch and similarity-pass seams."""
    from open_clip_safe import main as safe_main, safeclip, train

    device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    timer = PhaseTimer(device)

    def epoch_samples(_, model, data, *rest, **kwargs):
        return data["train"].dataloader.num_samples

    def steps_samples(_, model, loader, *rest, **kwargs):
        args = rest[4]
        return loader.num_batches * args.batch_size * args.world_size

    safeclip.open_clip_train_one_epoch = timer.wrap(safeclip.open_clip_train_one_epoch,
                                                    lambda *a, **k: "open_clip epoch", epoch_samples)
    train.run_steps = timer.wrap(train.run_steps, lambda *a, **k: a[8], steps_samples)
    train.similarity_pass = timer.wrap(train.similarity_pass, lambda *a, **k: "similarity pass",
                                       lambda result, *a, **k: len(result.ids))
    train.second_signal = timer.wrap(train.second_signal, lambda *a, **k: "second signal",
                                     lambda _, args, result: result.num_samples)
    train.mixed_epoch = timer.wrap(train.mixed_epoch, lambda *a, **k: "mixed epoch",
                                   lambda _, model, data, *rest, **k: data.num_samples)
    status = safe_main.main(argv)
    Path(report_path).write_text(json.dumps(timer.records, indent=1))
    return status


# ---------------------------------------------------------------- the benchmark


def run_timed(argv, report_path, log_path):
    """One timed training run in a fresh process, its epoch-level progress echoed as the demo does."""
    from open_clip_safe.demo import train

    code = ("import sys; from open_clip_safe.bench import timed_run; "
            "sys.exit(timed_run(sys.argv[1], sys.argv[2:]))")
    train([sys.executable, "-c", code, str(report_path), *map(str, argv)], log_path, quiet=False)
    return json.loads(Path(report_path).read_text())


def rate(records, phase):
    """Seconds a sample of every `phase` record together, or None if none ran."""
    found = [r for r in records if r["phase"] == phase]
    return sum(r["seconds"] for r in found) / sum(r["samples"] for r in found) if found else None


def mixed_overheads(records):
    """Per mixed epoch: seconds a sample beyond its pass and sub-epochs (the split, its log, fast mode's
    gather), and whether a pass ran. The timers record in return order, so a mixed epoch's own
    records come just before it."""
    epochs, inner, had_pass = [], 0.0, False
    for record in records:
        if record["phase"] == "mixed epoch":
            epochs.append(((record["seconds"] - inner) / record["samples"], had_pass))
            inner, had_pass = 0.0, False
        elif record["phase"] in ("similarity pass", "second signal", "risky", "safe"):
            inner += record["seconds"]
            had_pass = had_pass or record["phase"] == "similarity pass"
        else:
            inner, had_pass = 0.0, False
    return epochs


def summarize(plain, safe, fractions, mode="faithful"):
    """Per-phase rows (samples/s, ratio to open_clip) and the whole-run ratio."""
    plain_epochs = [r for r in plain if r["phase"] == "open_clip epoch"]
    plain_rate = 1 / rate(plain, "open_clip epoch")
    rows = [{"phase": "open_clip epoch", "samples": plain_epochs[0]["samples"],
             "seconds": sum(r["seconds"] for r in plain_epochs) / len(plain_epochs), "samples_per_s": plain_rate,
             "ratio": 1.0, "peak_memory_mib": max(r["peak_memory_mib"] for r in plain_epochs)}]

    def add(name, record):
        rate = record["samples"] / record["seconds"]
        rows.append({"phase": name, "samples": record["samples"], "seconds": record["seconds"], "samples_per_s": rate,
                     "ratio": plain_rate / rate, "peak_memory_mib": record["peak_memory_mib"]})

    for tag, name in (("inmodal", "SafeCLIP in-modal warm-up epoch"), ("crossmodal", "SafeCLIP cross-modal epoch")):
        add(name, next(r for r in safe if r["phase"] == tag))
    for phase, name in (("similarity pass", "similarity pass"), ("second signal", "second signal (neighbours)")):
        runs = [r for r in safe if r["phase"] == phase]
        if runs:
            add(name, {**runs[0], "seconds": sum(r["seconds"] for r in runs) / len(runs),
                       "peak_memory_mib": max(r["peak_memory_mib"] for r in runs)})
    passes = [had_pass for _, had_pass in mixed_overheads(safe)]
    for fraction, record, had_pass in zip(fractions, [r for r in safe if r["phase"] == "mixed epoch"], passes):
        add(f"SafeCLIP{' fast' if mode == 'fast' else ''} mixed epoch, safe {fraction:.0%} "
            f"({'pass included' if had_pass else 'no pass'})", record)
    plain_total = sum(r["seconds"] for r in plain_epochs)
    safe_total = sum(r["seconds"] for r in safe if r["phase"] in ("inmodal", "crossmodal", "mixed epoch"))
    return rows, {"open_clip_seconds": plain_total, "safeclip_seconds": safe_total, "ratio": safe_total / plain_total}


FORWARD_SHARE = 1 / 3  # a forward without backward, as a share of a training step (backward ~ two forwards)
AUTHORS = dict(inmodal=5, crossmodal=1, epochs=32, start=0.15, step=0.01, cap=0.85)  # docs/design.md


def authors_fractions():
    mixed = AUTHORS["epochs"] - AUTHORS["inmodal"] - AUTHORS["crossmodal"]
    return [min(AUTHORS["cap"], AUTHORS["start"] + AUTHORS["step"] * m) for m in range(mixed)]


def arithmetic_ratio(inmodal, crossmodal, fractions, clip_views, fast):
    """A schedule's cost in open_clip epochs, counted in views of both towers: an in-modal step sees two,
    a CLIP step `clip_views`, the pass is a forward (FORWARD_SHARE) over all samples, in fast mode only
    before the first mixed epoch. Data loading and the split count nothing here."""
    cost = 2 * inmodal + clip_views * crossmodal
    for mixed_epoch, fraction in enumerate(fractions):
        cost += 2 * (1 - fraction) + clip_views * fraction + (FORWARD_SHARE if mixed_epoch == 0 or not fast else 0)
    return cost / (inmodal + crossmodal + len(fractions))


def projected_ratio(plain, safe, inmodal, crossmodal, fractions):
    """A schedule's time over open_clip's for as many epochs, from a run's measured seconds a sample per
    phase: warm-up epochs, risky and safe sub-epochs, the pass, and each mixed epoch's other work (the
    first mixed epoch's as measured, later ones' as the mean of the later ones measured)."""
    overheads = mixed_overheads(safe)
    later = [overhead for overhead, _ in overheads[1:]] or [overheads[0][0]]
    cost = inmodal * rate(safe, "inmodal") + crossmodal * rate(safe, "crossmodal")
    for mixed_epoch, fraction in enumerate(fractions):
        had_pass = overheads[min(mixed_epoch, len(overheads) - 1)][1]
        cost += (1 - fraction) * rate(safe, "risky") + fraction * rate(safe, "safe")
        cost += overheads[0][0] if mixed_epoch == 0 else sum(later) / len(later)
        cost += rate(safe, "similarity pass") if had_pass else 0.0
    return cost / ((inmodal + crossmodal + len(fractions)) * rate(plain, "open_clip epoch"))


def whole_run_rows(plain, runs, fractions, clip_views):
    """Per SafeCLIP mode (name -> (records, whole-run summary)): the measured whole-run ratio, the
    schedule's arithmetic, and both for the authors' 32-epoch schedule."""
    rows = []
    for mode, (safe, whole) in runs.items():
        fast = mode == "fast"
        arithmetic = arithmetic_ratio(1, 1, fractions, clip_views, fast)
        rows.append({"mode": mode, "ratio": whole["ratio"], "arithmetic": arithmetic,
                     "over_arithmetic": whole["ratio"] / arithmetic,
                     "authors_projected": projected_ratio(plain, safe, AUTHORS["inmodal"], AUTHORS["crossmodal"],
                                                          authors_fractions()),
                     "authors_arithmetic": arithmetic_ratio(AUTHORS["inmodal"], AUTHORS["crossmodal"],
                                                            authors_fractions(), clip_views, fast)})
    return rows


def markdown(rows, whole, epochs, hardware, whole_rows=(), data_rows=()):
    lines = [f"Hardware: {hardware}", "",
             "| phase | samples | seconds | samples/s | time vs open_clip | peak memory (MiB) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['phase']} | {row['samples']} | {row['seconds']:.1f} | {row['samples_per_s']:.0f} | "
                     f"{row['ratio']:.2f}x | {row['peak_memory_mib']:.0f} |")
    lines.append(f"| whole run, {epochs} epochs | | {whole['safeclip_seconds']:.1f} vs {whole['open_clip_seconds']:.1f}"
                 f" | | {whole['ratio']:.2f}x | |")
    if whole_rows:
        lines += ["", f"| SafeCLIP mode | whole run, {epochs} epochs | its arithmetic | measured / arithmetic | "
                      f"authors' 32 epochs, from measured rates | authors' 32 epochs, arithmetic |",
                  "|---|---|---|---|---|---|"]
        for row in whole_rows:
            lines.append(f"| {row['mode']} | {row['ratio']:.2f}x | {row['arithmetic']:.2f}x | "
                         f"{row['over_arithmetic']:.2f} | {row['authors_projected']:.2f}x | "
                         f"{row['authors_arithmetic']:.2f}x |")
    if data_rows:
        lines += ["", "| data only (no model), every sample once | seconds | vs an open_clip epoch |", "|---|---|---|"]
        for row in data_rows:
            lines.append(f"| {row['what']} | {row['seconds']:.1f} | {row['ratio']:.2f}x |")
    return "\n".join(lines)


def data_only(train_data, model, batch_size, workers, text_aug="eda"):
    """Seconds to read every shard raw (tar records, no decode: what a subset stream spends on each
    sample it skips), to run open_clip's training stream, the pass's data pipeline (decode,
    transform, tokenize) and SafeCLIP's training stream (the authors' image views and EDA captions,
    as the bench's SafeCLIP runs use) with two views and with one, each without a model: on a
    machine whose cores also train, this work is not hidden behind the model's."""
    from types import SimpleNamespace

    import open_clip
    import webdataset as wds
    from open_clip_train.data import SharedEpoch, get_wds_dataset, tarfile_to_samples_nothrow

    from open_clip_safe import register_model_configs
    from open_clip_safe.augment import EdaAugmenter, image_augment_like
    from open_clip_safe.data import TwoViews, wds_num_samples, wds_pass_loader, wds_train_loader

    def seconds(stream):
        start = time.perf_counter()
        for _ in stream:
            pass
        return time.perf_counter() - start

    raw = seconds(wds.DataPipeline(wds.SimpleShardList(train_data), tarfile_to_samples_nothrow))
    register_model_configs()
    _, train_preprocess, preprocess = open_clip.create_model_and_transforms(model)
    tokenizer = open_clip.get_tokenizer(model)
    args = SimpleNamespace(train_data=train_data, workers=workers, world_size=1, batch_size=batch_size, seed=0,
                           dataset_resampled=False, train_num_samples=None, train_data_upsampling_factors=None)
    pass_views = TwoViews(preprocess, None, tokenizer, 0, preprocess)
    train_views = TwoViews(image_augment_like(train_preprocess), EdaAugmenter() if text_aug == "eda" else None,
                           tokenizer, 0)
    count = wds_num_samples(args)
    open_clip_stream = get_wds_dataset(args, train_preprocess, is_train=True, tokenizer=tokenizer).dataloader
    return [("raw read of every shard", raw), ("open_clip's training stream", seconds(open_clip_stream)),
            ("the pass's data pipeline", seconds(wds_pass_loader(args, pass_views, 2 * batch_size))),
            *((f"SafeCLIP's training stream, {name}", seconds(wds_train_loader(args, train_views, SharedEpoch(0),
                                                                              count, both_views=both)))
              for name, both in (("two views", True), ("one view", False)))]


def hardware_name(device):
    import platform

    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} ({torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads ({torch.__version__})"


# ---------------------------------------------------------------- host memory of the split at scale


def split_memory_rank(rank, world_size, port, num_samples, results):
    """One rank of `split_memory`: synthetic pass output through the real collectives, split and lookup."""
    import os

    import numpy as np
    import torch
    import torch.distributed as dist
    from types import SimpleNamespace

    from open_clip_safe.data import SplitLookup
    from open_clip_safe.schedule import SplitRule, gmm_clean_probability, top_fraction_mask
    from open_clip_safe.train import broadcast_mask
    from open_clip_safe import collectives

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    args = SimpleNamespace(rank=rank, world_size=world_size, distributed=True)
    rng = np.random.default_rng(rank)
    local = num_samples // world_size + (rank < num_samples % world_size)
    ids = rng.integers(0, 2**63 - 1, local, dtype=np.int64)
    sims = rng.normal(0.4, 0.1, local).astype(np.float32)
    poison = (rng.random(local) < 0.01).astype(np.int8)
    dist.barrier()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    counts = collectives.all_gather_counts(args, local)
    all_ids = collectives.gather_rows(args, ids, counts)
    all_sims = collectives.gather_rows(args, sims, counts, dst=0)
    all_poison = collectives.gather_rows(args, poison, counts, dst=0)  # held like the pass's, then dropped
    safe = None
    if rank == 0:
        score = gmm_clean_probability(all_sims)
        safe = top_fraction_mask(score, SplitRule().fraction_max, tiebreak=all_sims)
    del all_poison
    safe = broadcast_mask(args, safe, sum(counts))
    lookup = SplitLookup(all_ids, safe)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results[rank] = {"rank": rank, "samples": sum(counts), "extra_peak_bytes": peak - baseline,
                     "held_bytes": lookup.packed.nbytes, "seconds": seconds}
    dist.destroy_process_group()


def split_memory(num_samples, world_size=2):
    """Host memory one rank needs for the pass's gather, the split and the lookup, on synthetic arrays.

    Each rank's peak resident memory beyond its own pass output, measured in a fresh process per rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(split_memory_rank, args=(world_size, port, num_samples, results), nprocs=world_size)
    return [results[rank] for rank in range(world_size)]


def split_memory_table(rows, extrapolate_to=400_000_000):
    lines = [f"| rank | samples | peak extra host memory | bytes a sample | held after (lookup) | at {extrapolate_to:,} "
             f"samples | seconds |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        per_sample = row["extra_peak_bytes"] / row["samples"]
        lines.append(f"| {row['rank']} | {row['samples']:,} | {row['extra_peak_bytes'] / 2**20:,.0f} MiB | "
                     f"{per_sample:.1f} | {row['held_bytes'] / row['samples']:.1f} B a sample | "
                     f"{per_sample * extrapolate_to / 2**30:,.1f} GiB | {row['seconds']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the second signal at scale


def neighbour_scale(num_samples, reference, embed_dim, device, seed=0):
    """Seconds and peak memory of the second signal (neighbours.second_signal, one rank) over
    `num_samples` synthetic unit embeddings, `reference` the --safeclip-neighbour-reference cap.
    The search costs num_samples x min(num_samples, reference) cosines, twice (image and caption)."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from open_clip_safe import neighbours

    generator = torch.Generator().manual_seed(seed)

    def unit_rows(chunk=65536):  # built in float16 chunk by chunk: no float32 copy raises the baseline
        rows = torch.empty(num_samples, embed_dim, dtype=torch.float16)
        for begin in range(0, num_samples, chunk):
            part = torch.randn(min(chunk, num_samples - begin), embed_dim, generator=generator)
            rows[begin:begin + chunk] = part / part.norm(dim=1, keepdim=True)
        return rows

    image, text = unit_rows(), unit_rows()
    ids = np.random.default_rng(seed).integers(0, 2**62, num_samples, dtype=np.int64)
    digests = neighbours.image_digests(image, neighbours.projection(embed_dim, "cpu"))
    result = SimpleNamespace(local_ids=ids, num_samples=num_samples, image=image, text=text, digests=digests,
                             counts=[num_samples])
    args = SimpleNamespace(rank=0, world_size=1, distributed=False, device=device,
                           safeclip_neighbour_reference=reference, safeclip_score_quantile=0.05)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    signal = neighbours.second_signal(args, result)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"samples": num_samples, "reference": signal["reference"], "embed_dim": embed_dim, "device": device,
            "seconds": signal["seconds"], "peak_bytes": peak, "memory": "device" if cuda else "host, beyond inputs",
            "flagged": int(signal["flagged"].sum()), "hardware": hardware_name(device)}


def neighbour_scale_table(row):
    pairs = row["samples"] * row["reference"]
    return "\n".join([
        "| samples | reference | embedding dim | seconds | cosine pairs/s | peak memory | hardware |",
        "|---|---|---|---|---|---|---|",
        f"| {row['samples']:,} | {row['reference']:,} | {row['embed_dim']} | {row['seconds']:.1f} | "
        f"{2 * pairs / row['seconds']:.3g} | {row['peak_bytes'] / 2**20:,.0f} MiB ({row['memory']}) | {row['hardware']} |"])


def parse_args(argv):
    parser = Parser("bench", __doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out", help="Folder for the world, logs and the report.")
    parser.add_argument("--train-data", help="webdataset shards to time on (default: a generated world).")
    parser.add_argument("--num-train", type=int, default=8000, help="Size of the generated world.")
    parser.add_argument("--model", default="safeclip-tiny", help="open_clip model name.")
    parser.add_argument("--batch-size", type=int, default=128, help="Per-device batch size.")
    add_device_flags(parser)
    parser.add_argument("--workers", type=int, default=2, help="Data-loader workers.")
    parser.add_argument("--fractions", default="0.15,0.5,0.85",
                        help="Safe fractions of the timed mixed epochs (comma-separated, increasing).")
    parser.add_argument("--score", choices=("mixture", "neighbours"), default="mixture",
                        help="SafeCLIP's --safeclip-score; neighbours adds a row for the second signal.")
    parser.add_argument("--fast", action="store_true",
                        help="Also time SafeCLIP with --safeclip-fast, and time the data pipeline alone.")
    parser.add_argument("--clip-views", choices=("two", "one"), default="two",
                        help="SafeCLIP's CLIP loss on crosswise views (two, the authors) or on view 1 "
                             "(one: --safeclip-no-cross-aug, as the demo trains).")
    parser.add_argument("--split-memory", type=int, metavar="N",
                        help="Instead of timing training: the host memory two gloo ranks need for the similarity "
                             "pass's gather, the split and the lookup of N synthetic samples.")
    parser.add_argument("--neighbour-scale", type=int, metavar="N",
                        help="Instead of timing training: the second signal's time and memory on N synthetic "
                             "embeddings, on --device, one rank.")
    parser.add_argument("--neighbour-reference", type=int, default=1_000_000,
                        help="--neighbour-scale: the --safeclip-neighbour-reference cap.")
    parser.add_argument("--embed-dim", type=int, default=512,
                        help="--neighbour-scale: embedding width (ViT-B/32 and RN50: 512 and 1024).")
    parser.add_argument("--text-aug", choices=("eda", "none"), default="eda",
                        help="SafeCLIP's --safeclip-text-aug (none: where no WordNet is installed).")
    parser.add_argument("--data-path", action="store_true",
                        help="Instead of timing training: samples/s per data-loader worker core of open_clip's training "
                             "view, SafeCLIP's two views (workers' part; device part on --device), EDA and the "
                             "similarity pass's views, on synthetic 400 x 300 JPEGs at --image-size.")
    parser.add_argument("--image-size", type=int, default=224, help="--data-path: the views' size in pixels.")
    parser.add_argument("--data-samples", type=int, default=2000, help="--data-path: synthetic JPEGs to read.")
    parser.add_argument("--feed-rate", type=float, default=2000,
                        help="--data-path: the training rate (samples/s a GPU) to size the worker cores for.")
    args = resolve_precision(parser.parse_args(argv))
    if sum(map(bool, (args.split_memory, args.neighbour_scale, args.data_path))) > 1:
        parser.error("--split-memory, --neighbour-scale and --data-path are separate measurements; give one")
    if args.data_path and args.workers < 1:
        parser.error("--data-path times data-loader workers: --workers must be at least 1")
    for flag in ("split_memory", "neighbour_scale", "neighbour_reference", "embed_dim", "image_size", "data_samples",
                 "feed_rate"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    try:
        args.fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        parser.error(f"--fractions {args.fractions}: expected comma-separated numbers")
    if any(not 0 < f <= 1 for f in args.fractions) or args.fractions != sorted(args.fractions):
        parser.error("--fractions must be increasing, each in (0, 1]")
    steps = [b - a for a, b in zip(args.fractions, args.fractions[1:])] or [0.0]
    if any(abs(step - steps[0]) > 1e-9 for step in steps):
        parser.error("--fractions must be evenly spaced (SafeCLIP grows the safe fraction by a fixed step)")
    args.fraction_step = steps[0]
    if args.num_train < 4 * args.batch_size:
        parser.error("--num-train must hold at least 4 batches")
    return args


def shards_for(args):
    """Shards of the generated world: at least 8, and two a worker (main refuses fewer shards than workers)."""
    return max(8, 2 * args.workers)


def run_bench(args):
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_data = args.train_data
    if train_data is None:
        from open_clip_safe.world import generate_world

        world = out / "world"
        card = generate_world(world, args.num_train, 64, seed=0, formats=("wds",),
                              shard_size=max(1, args.num_train // shards_for(args)))
        train_data = card["splits"]["train"]["shards"]
    fractions = args.fractions
    epochs = 2 + len(fractions)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = ["--train-data", train_data, "--model", args.model, "--batch-size", args.batch_size, "--device",
              args.device, "--precision", args.precision, "--workers", args.workers, "--epochs", epochs,
              "--lr", 1e-3, "--warmup", 10, "--logs", out / "logs", "--save-frequency", 0]
    safe_flags = ["--safeclip", "--safeclip-inmodal-epochs", 1, "--safeclip-crossmodal-epochs", 1,
                  "--safeclip-split", "topk", "--safeclip-safe-fraction-start", fractions[0],
                  "--safeclip-safe-fraction-step", args.fraction_step, "--safeclip-safe-fraction-max", fractions[-1],
                  "--safeclip-score", args.score, "--safeclip-text-aug", args.text_aug,
                  "--safeclip-image-aug", "safeclip",  # the authors' views: the costlier path, as benchmark.md times it
                  "--safeclip-sim-views", "plain" if args.score == "neighbours" else "augmented"]
    if args.clip_views == "one":
        safe_flags.append("--safeclip-no-cross-aug")
    print(f"timing {epochs} plain open_clip epochs ({args.model}, batch {args.batch_size}, {args.device})", flush=True)
    plain = run_timed(common + ["--name", f"open_clip-{stamp}"], out / "plain.json", out / "plain.log")
    runs = {}
    for mode in ("faithful", "fast") if args.fast else ("faithful",):
        print(f"timing {epochs} SafeCLIP epochs ({mode}; safe fractions {fractions})", flush=True)
        flags = safe_flags + (["--safeclip-fast"] if mode == "fast" else [])
        name = "safeclip" if mode == "faithful" else "safeclip-fast"
        safe = run_timed(common + ["--name", f"{name}-{stamp}"] + flags, out / f"{name}.json", out / f"{name}.log")
        runs[mode] = (safe, summarize(plain, safe, fractions, mode))
    rows, whole = runs["faithful"][1]
    if args.fast:
        rows = rows + [row for row in runs["fast"][1][0] if "fast" in row["phase"]]
    views = 2 if args.clip_views == "two" else 1
    whole_rows = whole_run_rows(plain, {mode: (safe, summary[1]) for mode, (safe, summary) in runs.items()},
                                fractions, views)
    data_rows = []
    if args.fast:
        print("timing the data pipeline alone", flush=True)
        plain_epoch = rows[0]["seconds"]
        data_rows = [{"what": what, "seconds": seconds, "ratio": seconds / plain_epoch}
                     for what, seconds in data_only(train_data, args.model, args.batch_size, args.workers,
                                                    args.text_aug)]
    table = markdown(rows, whole, epochs, hardware_name(args.device), whole_rows, data_rows)
    (out / "bench.md").write_text(table + "\n")
    (out / "bench.json").write_text(json.dumps({"args": vars(args), "rows": rows, "whole_run": whole,
                                                 "modes": whole_rows, "data_only": data_rows}, indent=2))
    print(table)
    return rows, whole


def run_split_memory(args):
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"split memory: {args.split_memory:,} synthetic samples over 2 gloo ranks", flush=True)
    rows = split_memory(args.split_memory)
    table = split_memory_table(rows)
    (out / "split_memory.md").write_text(table + "\n")
    (out / "split_memory.json").write_text(json.dumps(rows, indent=2))
    print(table)
    return rows


def run_neighbour_scale(args):
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"second signal: {args.neighbour_scale:,} synthetic embeddings, reference up to "
          f"{args.neighbour_reference:,}, on {args.device}", flush=True)
    row = neighbour_scale(args.neighbour_scale, args.neighbour_reference, args.embed_dim, args.device)
    table = neighbour_scale_table(row)
    (out / "neighbour_scale.md").write_text(table + "\n")
    (out / "neighbour_scale.json").write_text(json.dumps(row, indent=2))
    print(table)
    return row


def run_data_path(args):
    from open_clip_safe import datapath

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"data path at {args.image_size} px: {args.data_samples} synthetic JPEGs, {args.workers} worker(s)",
          flush=True)
    rows = datapath.measure(out, args.image_size, args.workers, args.data_samples, args.batch_size, args.device,
                            text_aug=args.text_aug)
    text = datapath.table(rows, args.image_size, args.workers, args.feed_rate, hardware_name(args.device))
    (out / "data_path.md").write_text(text + "\n")
    (out / "data_path.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(text)
    return rows


def main(argv=None):
    def run(args):
        if args.data_path:
            return run_data_path(args)
        if args.split_memory:
            return run_split_memory(args)
        return run_neighbour_scale(args) if args.neighbour_scale else run_bench(args)

    return guarded("bench", lambda: run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
