"""The demo's quick smoke run end to end, and the benchmark on a tiny world; both through their CLIs."""
import importlib
import json
import os
import re
import subprocess
import time

import pytest

from conftest import REPO, run_cli, run_module


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = run_module("open_clip_safe.demo", "--quick", "--out", out, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in range(1, 7):
        assert f"[{stage}/6]" in done.stdout
    assert "| CLIP |" in done.stdout and "| SafeCLIP |" in done.stdout
    summary = json.loads((out / "report" / "results.json").read_text())
    clip, safe = summary["rows"]
    cards = [json.loads((out / "poisoned" / name / "attack.json").read_text())
             for name in ("backdoor", "backdoor+targeted")]
    assert cards[0]["kind"] == "backdoor" and cards[1]["kind"] == "targeted"
    assert clip["poisoned_total"] == cards[0]["num_poisoned"] + cards[1]["num_poisoned"] > 0
    for row in (clip, safe):
        assert 0 <= row["top1"] <= 1 and 0 <= row["backdoor_asr"] <= 1 and row["wall_seconds"] > 0
        assert row["num_targets"] == cards[1]["num_poisoned"] // 4
    assert clip["poisoned_in_safe_max"] is None
    # the SafeCLIP run's similarity log saw every poisoned training sample, flagged from the shards' json
    diagnostics = summary["split_diagnostics"]
    assert len(diagnostics) == 1 and diagnostics[0]["poisoned"] == clip["poisoned_total"]
    assert safe["poisoned_in_safe_max"] == diagnostics[0]["poisoned_in_safe"]
    assert safe["split_auc"] == [diagnostics[0]["detector"]["all"]["auc"]] and 0 <= safe["split_auc"][0] <= 1
    assert diagnostics[0]["detector"]["backdoor"]["samples"] == cards[0]["num_poisoned"]
    assert diagnostics[0]["detector"]["targeted"]["samples"] == cards[1]["num_poisoned"]
    assert "split ROC AUC" in done.stdout
    assert (out / "report" / "results.md").read_text().startswith("| method |")
    assert (out / "report" / "plots" / "safe_fraction.png").is_file()
    for name in ("clip", "safeclip"):
        assert (out / "logs" / name / "checkpoints" / "epoch_3.pt").is_file()
    trained_with = (out / "logs" / "safeclip" / "params.txt").read_text().splitlines()
    assert "safeclip_cross_aug: False" in trained_with and "safeclip_safe_fraction_step: 0.25" in trained_with
    assert "model: safeclip-micro" in trained_with and "safeclip_score: neighbours" in trained_with
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # README's table names the commit and date of the report it quotes
        assert summary["commit"].split("+")[0] == head.stdout.strip() and summary["date"] == time.strftime("%Y-%m-%d")
    again = run_module("open_clip_safe.demo", "--quick", "--out", out)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (out / "report" / "results.json").is_file(), "a refused rerun deletes nothing"


@pytest.mark.slow
def test_gpu_check_script_at_toy_size_on_cpu_times_every_phase(tmp_path, wordnet):
    """scripts/gpu_check.sh, the GPU machine's one-call check, run at toy size on the CPU: its SafeCLIP
    run goes through every phase and its benchmark times every phase."""
    out = tmp_path / "check"
    done = run_cli(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), str(out)], timeout=1200,
                   GPU_CHECK_DEVICE="cpu", GPU_CHECK_SIZE="toy")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "gpu_check.md").read_text()
    for epoch, phase in ((0, "inmodal"), (1, "crossmodal"), (2, "mixed"), (3, "mixed")):
        assert f"SafeCLIP epoch {epoch}: {phase} phase" in summary
    assert summary.count("similarity pass") >= 2 and "| whole run, 4 epochs |" in summary
    assert "## Second signal (`--neighbour-scale 2000`)" in summary and "| 2,000 | 2,000 | 512 |" in summary
    assert "captions: EDA (WordNet found)" in summary
    assert "Data path at 32 px, 1 data-loader worker(s)" in summary
    data_path = json.loads((out / "data_path" / "data_path.json").read_text())["rows"]
    assert len(data_path) == 7 and all(row["samples_per_s"] > 0 for row in data_path)
    params = (out / "logs" / "safeclip" / "params.txt").read_text().splitlines()
    assert "workers: 1" in params and "safeclip_text_aug: eda" in params
    assert len(list((out / "world" / "train").glob("*.tar"))) == 2, "two shards a worker, as at GPU size"
    split = json.loads((out / "split.json").read_text())["split_diagnostics"]
    assert [row["epoch"] for row in split] == [2, 3] and split[0]["poisoned"] == 6  # 5% of 128

    report = json.loads((out / "bench" / "bench.json").read_text())
    phases = [row["phase"] for row in report["rows"]]
    assert phases[:4] == ["open_clip epoch", "SafeCLIP in-modal warm-up epoch", "SafeCLIP cross-modal epoch",
                          "similarity pass"]
    assert [p for p in phases if p.startswith("SafeCLIP mixed")] == [
        "SafeCLIP mixed epoch, safe 25% (pass included)", "SafeCLIP mixed epoch, safe 75% (pass included)"]
    for row in report["rows"]:
        assert row["seconds"] > 0 and row["samples_per_s"] > 0 and row["peak_memory_mib"] > 0
    assert report["rows"][0]["samples"] == 128 and report["rows"][3]["samples"] == 128
    assert report["whole_run"]["ratio"] == pytest.approx(
        report["whole_run"]["safeclip_seconds"] / report["whole_run"]["open_clip_seconds"])
    assert "| whole run, 4 epochs |" in (out / "bench" / "bench.md").read_text()
    # --fast: a third run whose later mixed epochs skip the pass, next to the faithful one and the arithmetic
    assert [p for p in phases if p.startswith("SafeCLIP fast")] == [
        "SafeCLIP fast mixed epoch, safe 25% (pass included)", "SafeCLIP fast mixed epoch, safe 75% (no pass)"]
    modes = {row["mode"]: row for row in report["modes"]}
    assert set(modes) == {"faithful", "fast"} and modes["faithful"]["ratio"] == report["whole_run"]["ratio"]
    assert modes["faithful"]["arithmetic"] == pytest.approx((2 + 2 + 2 + 1 / 3 + 2 + 1 / 3) / 4)
    assert modes["fast"]["arithmetic"] == pytest.approx((2 + 2 + 2 + 1 / 3 + 2) / 4)
    for row in report["modes"]:
        assert row["over_arithmetic"] == pytest.approx(row["ratio"] / row["arithmetic"])
        assert 1 < row["authors_projected"] < 20 and row["authors_arithmetic"] > 2
    assert [row["what"] for row in report["data_only"]] == [
        "raw read of every shard", "open_clip's training stream", "the pass's data pipeline",
        "SafeCLIP's training stream, two views",
        "SafeCLIP's training stream, one view"]
    assert all(row["seconds"] > 0 for row in report["data_only"])


class FakePeak:
    """A device peak counter the test drives: allocate() raises the level, free() lowers it."""

    def __init__(self):
        self.level = self.peak = 0.0

    def allocate(self, mib):
        self.level += mib
        self.peak = max(self.peak, self.level)

    def free(self, mib):
        self.level -= mib

    def sync(self):
        pass

    def read(self):
        return self.peak

    def reset(self):
        self.peak = self.level


def test_an_enclosing_phase_keeps_the_peak_of_the_phases_inside_it():
    """A mixed epoch holds its pass and sub-epochs; each resets the device peak for its own figure, and the
    mixed epoch's figure must still be the largest of them."""
    from open_clip_safe import bench

    peak = FakePeak()
    timer = bench.PhaseTimer("cuda", peak=peak)

    def phase(name, mib):
        def run():
            peak.allocate(mib)
            peak.free(mib)
        return timer.wrap(run, lambda: name, lambda result: 1)

    def mixed_epoch():
        phase("similarity pass", 900)()
        phase("risky", 300)()
        peak.allocate(50)
        peak.free(50)
        phase("safe", 400)()

    timer.wrap(mixed_epoch, lambda: "mixed epoch", lambda result: 1)()
    phase("inmodal", 100)()
    peaks = {record["phase"]: record["peak_memory_mib"] for record in timer.records}
    assert peaks == {"similarity pass": 900, "risky": 300, "safe": 400, "mixed epoch": 900, "inmodal": 100}


@pytest.mark.slow
def test_data_path_table_per_worker_core(tmp_path, wordnet):
    """bench --data-path at a small size: every stream read through its real loader, per worker core, open_clip's
    view the reference, and the cores to feed the stated rate."""
    from open_clip_safe import bench

    assert bench.main(["--data-path", "--image-size", "64", "--data-samples", "96", "--batch-size", "16",
                       "--workers", "1", "--feed-rate", "1000", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "data_path.json").read_text())["rows"]
    assert [row["what"].split(",")[0].split(" (")[0] for row in rows] == [
        "open_clip's training view", "SafeCLIP", "SafeCLIP", "similarity pass", "similarity pass", "EDA", "SafeCLIP"]
    assert all(row["samples_per_s"] > 0 for row in rows) and rows[-1]["per_core"] is None
    table = (tmp_path / "data_path.md").read_text()
    assert "Data path at 64 px, 1 data-loader worker(s)" in table and "| open_clip's training view |" in table
    assert "| 1.00x |" in table and "worker cores to feed 1,000 samples/s" in table
    shards = sorted((tmp_path / "jpeg_shards").glob("*.tar"))
    assert len(shards) == 4 and (tmp_path / "jpeg_shards" / "sizes.json").is_file()


def test_arithmetic_of_the_authors_schedule():
    from open_clip_safe import bench

    fractions = bench.authors_fractions()
    assert len(fractions) == 26 and fractions[0] == 0.15 and fractions[-1] == pytest.approx(0.40)
    mixed_safe = sum(fractions)
    # two views everywhere and a pass each mixed epoch: 2 a step, 1/3 a pass
    assert bench.arithmetic_ratio(5, 1, fractions, 2, fast=False) == pytest.approx((12 + 26 * 2 + 26 / 3) / 32)
    # one-view CLIP loss, pass only before the first mixed epoch
    assert bench.arithmetic_ratio(5, 1, fractions, 1, fast=True) == pytest.approx(
        (11 + 2 * (26 - mixed_safe) + mixed_safe + 1 / 3) / 32)


def test_projection_from_measured_rates_reproduces_the_measured_run():
    """Projected to the schedule a run measured, the per-phase rates give back its whole-run ratio."""
    from open_clip_safe import bench

    def record(phase, seconds, samples=100):
        return {"phase": phase, "seconds": seconds, "samples": samples}

    plain = [record("open_clip epoch", 10)] * 4
    safe = [record("inmodal", 20), record("crossmodal", 12),
            record("similarity pass", 4), record("risky", 15), record("safe", 3), record("mixed epoch", 23),
            record("risky", 5), record("safe", 9), record("mixed epoch", 15)]
    fractions = [0.25, 0.75]  # what the records' risky / safe seconds per sample are built on
    safe[3]["samples"], safe[4]["samples"], safe[6]["samples"], safe[7]["samples"] = 75, 25, 25, 75
    measured = (20 + 12 + 23 + 15) / 40
    assert bench.projected_ratio(plain, safe, 1, 1, fractions) == pytest.approx(measured, rel=0.02)
    assert [had for _, had in bench.mixed_overheads(safe)] == [True, False]


@pytest.mark.slow
def test_split_memory_is_measured_per_rank(tmp_path):
    done = run_module("open_clip_safe.bench", "--split-memory", 50_000, "--out", tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "split_memory.json").read_text())
    assert [row["rank"] for row in rows] == [0, 1] and all(row["samples"] == 50_000 for row in rows)
    assert all(row["held_bytes"] == 8 * 50_000 for row in rows), "the lookup holds 8 bytes a sample"
    assert all(row["extra_peak_bytes"] > 0 for row in rows)
    assert "at 400,000,000 samples" in (tmp_path / "split_memory.md").read_text()


def test_neighbour_scale_times_the_second_signal_against_a_capped_reference(tmp_path):
    from open_clip_safe import bench

    assert bench.main(["--neighbour-scale", "3000", "--neighbour-reference", "1000", "--embed-dim", "64",
                       "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "neighbour_scale.json").read_text())
    assert row["samples"] == 3000 and 850 < row["reference"] < 1150, "a fixed random subset of about the cap"
    assert row["flagged"] == pytest.approx(0.05 * 3000, abs=2), "random embeddings: no copies, the 5% quantile"
    assert row["seconds"] > 0 and row["peak_bytes"] >= 0
    assert "| 3,000 |" in (tmp_path / "neighbour_scale.md").read_text()


@pytest.mark.parametrize("module, args, message", [
    ("open_clip_safe.bench", ["--split-memory", "10", "--neighbour-scale", "10"], "separate measurements"),
    ("open_clip_safe.bench", ["--neighbour-scale", "0"], "--neighbour-scale must be at least 1"),
    ("open_clip_safe.bench", ["--data-path", "--split-memory", "10"], "separate measurements"),
    ("open_clip_safe.bench", ["--data-path", "--workers", "0"], "--workers must be at least 1"),
    ("open_clip_safe.bench", ["--data-path", "--image-size", "0"], "--image-size must be at least 1"),
    ("open_clip_safe.demo", ["--epochs", "1", "--quick"], "--epochs must leave"),
    ("open_clip_safe.demo", ["--main-defaults", "--score", "mixture"], "--main-defaults trains SafeCLIP with main's"),
    ("open_clip_safe.demo", ["--main-defaults", "--epochs", "2"], "--epochs must leave at least one mixed SafeCLIP "
                                                                   "epoch after 2 warm-up epochs"),
    ("open_clip_safe.demo", ["--fast", "--score", "neighbours"], "--fast cannot take --score neighbours"),
    ("open_clip_safe.bench", ["--fractions", "0.5,0.2"], "--fractions must be increasing"),
    ("open_clip_safe.bench", ["--num-train", "10"], "--num-train must hold"),
    ("open_clip_safe.bench", ["--fractions", "0.1,0.2,0.9"], "evenly spaced"),
])
def test_bad_input_exits_2(module, args, message, tmp_path, capsys):
    """In-process (a process start costs ~10 s of imports; the quick demo runs the real process)."""
    main = importlib.import_module(module).main
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def safeclip_flags_of_the_demo(*argv):
    from open_clip_safe import demo, params

    _, config = demo.parse_args(list(argv))
    command = demo.training_command(config, "train.tar", "logs", "safeclip", 0, safeclip=True)
    safeclip = command[command.index("--safeclip"):]
    args = params.parse_open_clip_args(command[3:command.index("--safeclip")])
    known, rest = params.safeclip_parser().parse_known_args(safeclip)
    assert rest == []
    vars(args).update(vars(known))
    params.check_safeclip_args(args, params.safeclip_parser().parse_args([]))
    return config, safeclip, args


def test_the_demo_trains_safeclip_with_the_measured_score_and_main_defaults_on_request():
    config, _, args = safeclip_flags_of_the_demo()
    assert (args.safeclip_score, args.safeclip_sim_views, args.safeclip_safe_fraction_step) == ("neighbours", "plain",
                                                                                                 0.25)
    assert args.safeclip_rank_similarity == "relative"
    _, _, args = safeclip_flags_of_the_demo("--fast")
    assert args.safeclip_fast and args.safeclip_score == "mixture" and args.safeclip_rank_similarity == "raw"
    config, flags, args = safeclip_flags_of_the_demo("--main-defaults", "--epochs", "10")
    assert flags == ["--safeclip"] and config.epochs == 10 and not config.small_run
    assert (args.safeclip_inmodal_epochs, args.safeclip_crossmodal_epochs, args.safeclip_text_aug,
            args.safeclip_image_aug, args.safeclip_score, args.safeclip_safe_fraction_step) == (
        1, 1, "none", "open_clip", "neighbours", None)
    config, flags, args = safeclip_flags_of_the_demo("--world", "tiles-noise", "--main-defaults")
    assert (config.world_style, config.patch_kind, config.patch_location, config.target) == (
        "tiles", "noise", "bottom-right", "rocket")
    assert (config.poison_rate, config.epochs, flags) == (0.02, 10, ["--safeclip"])
    from open_clip_safe import params

    _, flags, _ = safeclip_flags_of_the_demo()
    assert {params.flag_of(name) for name in params.PRESETS["measured"]} <= set(flags), \
        "the demo gives every flag a preset sets, so its measured rows do not move with the preset"


def test_gpu_size_of_gpu_check_gives_every_worker_its_shards():
    """The GPU size cannot run here; its worker and shard arithmetic can be checked: main refuses fewer
    shards than workers (the script's benchmark once passed --workers 12 for a world of 8 shards)."""
    from types import SimpleNamespace

    from open_clip_safe import bench

    script = open(os.path.join(REPO, "scripts", "gpu_check.sh")).read()
    gpu = script.split("else\n", 1)[1].split("fi\n", 1)[0]
    settings = dict(re.findall(r"\b([A-Z_]+)=(\d+)\b", gpu))
    workers, num_train = int(settings["WORKERS"]), int(settings["NUM_TRAIN"])
    assert "SHARDS=$((2 * WORKERS))" in script and num_train % (2 * workers) == 0
    assert bench.shards_for(SimpleNamespace(workers=workers)) >= workers
    limits = [int(x) for x in re.search(r"LIMITS=\(([\d ]+)\)", gpu).group(1).split()]
    assert sum(limits) < 8 * 60 and len(limits) == script.count('step "${LIMITS[')
