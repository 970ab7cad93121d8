"""The SafeCLIP flag group: defaults, help, and invalid combinations refused with exit 2."""
import pytest

from open_clip_safe import params


def parse(world, *flags):
    return params.parse_args(["--train-data", world["splits"]["train"]["shards"], "--workers", "1", *flags])


def test_defaults_are_the_authors_but_for_the_measured_presets(world):
    args = parse(world, "--safeclip", "--epochs", "32")
    assert (args.safeclip_inmodal_epochs, args.safeclip_crossmodal_epochs) == (1, 1)
    assert args.safeclip_filter_lr is None and args.safeclip_crossmodal_warmup is None  # auto: from the step count
    assert args.safeclip_inmodal_lr is None  # auto: --lr / 5
    assert (args.safeclip_first_split_threshold, args.safeclip_safe_fraction_max,
            args.safeclip_safe_fraction_start) == (0.9, 0.85, 0.15)
    assert args.safeclip_split == "gmm" and args.safeclip_update_freq == 1
    assert args.safeclip_cross_aug and args.safeclip_text_aug == "none" and args.safeclip_memory_bank_size == 0
    assert args.safeclip_image_aug == "open_clip" and args.safeclip_crop_scale == 0.08
    assert args.safeclip_preset == "measured" and args.safeclip_preset_note is None
    assert (args.safeclip_score, args.safeclip_sim_views, args.safeclip_safe_fraction_step) == ("neighbours", "plain",
                                                                                                 None)
    assert args.safeclip_rank_similarity == "relative"
    plain = parse(world)
    assert not plain.safeclip and plain.lr == 5e-4, "open_clip's own defaults still apply"


def test_the_authors_preset_gives_the_authors_values(world):
    args = parse(world, "--safeclip", "--epochs", "32", "--safeclip-preset", "authors")
    assert (args.safeclip_score, args.safeclip_sim_views, args.safeclip_safe_fraction_step) == ("mixture",
                                                                                                 "augmented", 0.01)
    assert args.safeclip_preset_note is None and args.safeclip_rank_similarity == "raw"
    assert (args.safeclip_inmodal_epochs, args.safeclip_crossmodal_epochs, args.safeclip_filter_lr,
            args.safeclip_crossmodal_warmup, args.safeclip_inmodal_lr) == (5, 1, 5e-6, 0, "lr")
    assert (args.safeclip_image_aug, args.safeclip_text_aug, args.safeclip_crop_scale) == ("safeclip", "eda", 0.08)


@pytest.mark.parametrize("flags, image_aug, note", [
    (["--safeclip-blur-sigma", "0.5", "1.0"], "safeclip", "SafeCLIP preset measured: so --safeclip-image-aug safeclip"),
    (["--safeclip-crop-scale", "0.5"], "safeclip", "SafeCLIP preset measured: so --safeclip-image-aug safeclip"),
    (["--safeclip-image-aug", "safeclip", "--safeclip-crop-scale", "0.5"], "safeclip",
     "SafeCLIP preset measured: given flags win: --safeclip-image-aug safeclip (preset: open_clip)"),
    (["--safeclip-preset", "authors", "--safeclip-blur-sigma", "0.5", "1.0"], "safeclip", None),
])
def test_a_setting_of_the_authors_views_takes_those_views(world, flags, image_aug, note):
    args = parse(world, "--safeclip", "--epochs", "9", *flags)
    assert args.safeclip_image_aug == image_aug and args.safeclip_preset_note == note


@pytest.mark.parametrize("flags, values, note", [
    (["--safeclip-safe-fraction-step", "0.25"], ("neighbours", "plain", 0.25, "relative"),
     "SafeCLIP preset measured: given flags win: --safeclip-safe-fraction-step 0.25 (preset: auto)"),
    (["--safeclip-score", "mixture"], ("mixture", "plain", None, "raw"),
     "SafeCLIP preset measured: given flags win: --safeclip-score mixture (preset: neighbours); "
     "so --safeclip-rank-similarity raw"),
    (["--safeclip-sim-views", "augmented"], ("mixture", "augmented", None, "raw"),
     "SafeCLIP preset measured: given flags win: --safeclip-sim-views augmented (preset: plain); "
     "so --safeclip-score mixture, --safeclip-rank-similarity raw"),
    (["--safeclip-fast"], ("mixture", "plain", None, "raw"),
     "SafeCLIP preset measured: so --safeclip-score mixture, --safeclip-rank-similarity raw"),
    (["--safeclip-rank-similarity", "raw"], ("neighbours", "plain", None, "raw"),
     "SafeCLIP preset measured: given flags win: --safeclip-rank-similarity raw (preset: relative)"),
    (["--safeclip-preset", "authors", "--safeclip-score", "neighbours"], ("neighbours", "plain", 0.01, "raw"),
     "SafeCLIP preset authors: given flags win: --safeclip-score neighbours (preset: mixture); "
     "so --safeclip-sim-views plain"),
    (["--safeclip-preset", "authors", "--safeclip-safe-fraction-step", "auto"], ("mixture", "augmented", None, "raw"),
     "SafeCLIP preset authors: given flags win: --safeclip-safe-fraction-step auto (preset: 0.01)"),
    (["--safeclip-score", "neighbours", "--safeclip-sim-views", "plain"], ("neighbours", "plain", None, "relative"),
     None),
])
def test_given_flags_win_over_the_preset_in_one_line(world, flags, values, note):
    args = parse(world, "--safeclip", "--epochs", "9", *flags)
    assert (args.safeclip_score, args.safeclip_sim_views, args.safeclip_safe_fraction_step,
            args.safeclip_rank_similarity) == values
    assert args.safeclip_preset_note == note


def test_the_preset_line_reaches_the_run_log(world, caplog):
    import logging

    from open_clip_safe import safeclip

    args = parse(world, "--safeclip", "--epochs", "9", "--safeclip-score", "mixture")
    args.rank, args.distributed = 0, False
    caplog.set_level(logging.INFO)
    with pytest.raises(KeyboardInterrupt), pytest.MonkeyPatch.context() as patch:
        patch.setattr(safeclip, "open_clip_get_data", lambda *_, **__: (_ for _ in ()).throw(KeyboardInterrupt))
        safeclip.get_data(args, (None, None))
    assert "given flags win: --safeclip-score mixture (preset: neighbours)" in caplog.text


def test_help_shows_both_groups(capsys):
    """In-process; test_main's help test runs the real process."""
    with pytest.raises(SystemExit) as stop:
        params.parse_args(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert "--safeclip-memory-bank-size" in out and "--gather-with-grad" in out


@pytest.mark.parametrize("flags, message", [
    (["--safeclip-split", "topk"], "--safeclip-split needs --safeclip"),
    (["--safeclip", "--epochs", "1"], "--epochs 1 is fewer than the 2 SafeCLIP warm-up epochs"),
    (["--safeclip", "--epochs", "9", "--safeclip-filter-lr", "fast"], "expected a number or auto, got 'fast'"),
    (["--safeclip", "--epochs", "9", "--safeclip-inmodal-lr", "0"], "--safeclip-inmodal-lr must be positive, got 0.0"),
    (["--safeclip", "--epochs", "9", "--safeclip-safe-fraction-max", "1.5"],
     "--safeclip-safe-fraction-max must be in (0, 1], got 1.5"),
    (["--safeclip", "--epochs", "9", "--safeclip-first-split-threshold", "0"],
     "--safeclip-first-split-threshold must be in (0, 1]"),
    (["--safeclip", "--epochs", "9", "--safeclip-safe-fraction-step", "-0.1"],
     "--safeclip-safe-fraction-step must be in [0, 1]"),
    (["--safeclip", "--epochs", "9", "--safeclip-unlearn-fraction", "1.5"],
     "--safeclip-unlearn-fraction must be in [0, 1], got 1.5"),
    (["--safeclip", "--epochs", "9", "--accum-freq", "2"], "--safeclip does not support --accum-freq > 1"),
    (["--safeclip", "--epochs", "9", "--siglip"], "--safeclip does not support --siglip"),
    (["--safeclip", "--epochs", "9", "--model", "ViT-B-16-SigLIP"],
     "--safeclip does not support --model ViT-B-16-SigLIP: a model with a logit bias"),
    (["--safeclip", "--epochs", "9", "--safeclip-update-freq", "0"], "--safeclip-update-freq must be >= 1"),
    (["--safeclip", "--epochs", "9", "--safeclip-memory-bank-size", "-1"], "must be >= 0"),
    (["--safeclip", "--epochs", "9", "--safeclip-crossmodal-warmup", "-5"], "--safeclip-crossmodal-warmup must be >= 0"),
    (["--safeclip", "--epochs", "9", "--safeclip-crop-scale", "0"], "--safeclip-crop-scale must be in (0, 1], got 0.0"),
    (["--safeclip", "--epochs", "9", "--safeclip-split", "kmeans"], "invalid choice: 'kmeans'"),
    (["--safeclip", "--epochs", "9", "--safeclip-image-aug", "open_clip", "--safeclip-crop-scale", "0.5"],
     "with --safeclip-image-aug open_clip the crop comes from --aug-cfg scale=(lo,hi)"),
    (["--safeclip-image-aug", "open_clip"], "--safeclip-image-aug needs --safeclip"),
    (["--safeclip", "--epochs", "9", "--safeclip-color-jitter", "0.5", "-0.1", "0.5", "0.1"],
     "--safeclip-color-jitter: contrast must be >= 0, got -0.1"),
    (["--safeclip", "--epochs", "9", "--safeclip-color-jitter", "0.5", "0.5", "0.5", "0.6"],
     "--safeclip-color-jitter: hue must be in [0, 0.5], got 0.6"),
    (["--safeclip", "--epochs", "9", "--safeclip-color-jitter", "0.5", "0.5"], "expected 4 arguments"),
    (["--safeclip", "--epochs", "9", "--safeclip-blur-sigma", "0", "2"],
     "--safeclip-blur-sigma needs 0 < LOW <= HIGH, got 0.0 2.0"),
    (["--safeclip", "--epochs", "9", "--safeclip-blur-sigma", "2", "1"], "--safeclip-blur-sigma needs 0 < LOW <= HIGH"),
    (["--safeclip", "--epochs", "9", "--safeclip-augment-on", "gpu"], "invalid choice: 'gpu'"),
    (["--safeclip", "--epochs", "9", "--safeclip-image-aug", "open_clip", "--safeclip-blur-sigma", "1", "2"],
     "--safeclip-blur-sigma sets the authors' augmentation; --safeclip-image-aug open_clip has none"),
    (["--safeclip", "--epochs", "9", "--safeclip-image-aug", "open_clip", "--safeclip-augment-on", "device"],
     "--safeclip-augment-on device sets the authors' augmentation"),
    (["--safeclip-augment-on", "device"], "--safeclip-augment-on needs --safeclip"),
    (["--safeclip-preset", "authors"], "--safeclip-preset needs --safeclip"),
    (["--safeclip-score", "mixture"], "--safeclip-score needs --safeclip"),
    (["--safeclip", "--epochs", "9", "--safeclip-score", "neighbours", "--safeclip-sim-views", "augmented"],
     "--safeclip-score neighbours needs --safeclip-sim-views plain, not augmented"),
    (["--safeclip", "--epochs", "9", "--safeclip-fast", "--safeclip-score", "neighbours"],
     "--safeclip-fast cannot take --safeclip-score neighbours"),
    (["--safeclip", "--epochs", "9", "--safeclip-preset", "paper"], "invalid choice: 'paper'"),
    (["--safeclip-oracle-split"], "--safeclip-oracle-split needs --safeclip"),
])
def test_invalid_safeclip_settings(world, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        parse(world, *flags)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and message in error, error


def test_the_oracle_split_on_remote_data_is_refused_before_training(capsys):
    """Only rank 0 would see, at the first split, that remote data carries no poison metadata; so every
    rank refuses up front, where the metadata cannot be read first."""
    with pytest.raises(SystemExit) as exit_info:
        params.parse_args(["--train-data", "s3://bucket/{000000..000003}.tar", "--train-num-samples", "100",
                           "--workers", "1", "--safeclip", "--epochs", "9", "--safeclip-oracle-split"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("open_clip_safe.main: error: --safeclip-oracle-split reads the poison "
                                               "metadata of local data; s3://bucket/{000000..000003}.tar is remote")


def test_device_augmentation_without_that_device_is_one_line(world, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        parse(world, "--safeclip", "--epochs", "9", "--safeclip-augment-on", "device", "--device", "cuda")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error == ("open_clip_safe.main: error: --safeclip-augment-on device: --device cuda, but torch sees no CUDA "
                     "GPU on this machine; use --safeclip-augment-on workers, or --device cpu")


@pytest.mark.parametrize("device, augment_on, image_aug, expected", [
    ("cuda:0", "auto", "safeclip", True), ("cpu", "auto", "safeclip", False), ("cpu", "device", "safeclip", True),
    ("cuda", "workers", "safeclip", False), ("cuda", "auto", "open_clip", False)])
def test_where_the_views_photometric_part_runs(world, monkeypatch, device, augment_on, image_aug, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = parse(world, "--safeclip", "--epochs", "9", "--device", device, "--safeclip-image-aug", image_aug,
                 *(["--safeclip-augment-on", augment_on] if augment_on != "auto" else []))
    assert params.augment_on_device(args) is expected
    assert args.safeclip_color_jitter == [0.5, 0.5, 0.5, 0.1] and args.safeclip_blur_sigma == [0.1, 2.0]


def test_logit_bias_is_read_from_open_clip_configs_without_the_network():
    assert params.has_logit_bias("ViT-B-16-SigLIP") and params.has_logit_bias("ViT-B-16-SigLIP2")
    assert not params.has_logit_bias("RN50") and not params.has_logit_bias("safeclip-micro")
    assert not params.has_logit_bias("hf-hub:timm/ViT-B-16-SigLIP"), "hub models are not fetched at parse time"
