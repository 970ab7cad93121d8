"""Split diagnostics from a SafeCLIP run's per-epoch similarity logs (no peer reports these).

For every mixed epoch: how many poisoned samples reached the safe set (the defense needs 0), and
how well the risky set catches them (recall, precision), plus similarity histograms of clean vs
poisoned samples and the safe fraction over epochs as PNG plots.
"""
import glob
import os
import re

import numpy as np
import pyarrow.parquet as pq

from open_clip_safe.cli import percent

EPOCH_FILE = re.compile(r"epoch_(\d+)\.parquet$")


def similarity_files(run_log_dir):
    """Per-epoch Parquet logs under a run's log folder (LOGS/NAME) or its similarity/ folder."""
    folder = run_log_dir
    if os.path.isdir(os.path.join(run_log_dir, "similarity")):
        folder = os.path.join(run_log_dir, "similarity")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{run_log_dir}: no such folder")
    files = sorted(path for path in glob.glob(os.path.join(folder, "epoch_*.parquet")) if EPOCH_FILE.search(path))
    if not files:
        raise FileNotFoundError(f"{folder}: no epoch_NNN.parquet similarity logs (was the run trained with "
                                "--safeclip and at least one mixed epoch?)")
    return files


def ratio(numerator, denominator):
    return float(numerator) / denominator if denominator else None


def epoch_row(table):
    """One epoch's counts; poisoned-sample figures are None when the data carried no poison flags."""
    similarity = table["similarity"]
    safe = table["safe"].astype(bool)
    row = {"epoch": int(table["epoch"][0]), "samples": len(safe), "safe": int(safe.sum()),
           "safe_fraction": ratio(safe.sum(), len(safe)), "mean_similarity": float(similarity.mean()),
           "poisoned": None, "poisoned_in_safe": None, "risky_recall": None, "risky_precision": None,
           "mean_similarity_clean": None, "mean_similarity_poisoned": None}
    if "poisoned" in table:
        poisoned = table["poisoned"].astype(bool)
        risky = ~safe
        row.update(poisoned=int(poisoned.sum()), poisoned_in_safe=int((poisoned & safe).sum()),
                   risky_recall=ratio((poisoned & risky).sum(), poisoned.sum()),
                   risky_precision=ratio((poisoned & risky).sum(), risky.sum()),
                   mean_similarity_clean=float(similarity[~poisoned].mean()) if (~poisoned).any() else None,
                   mean_similarity_poisoned=float(similarity[poisoned].mean()) if poisoned.any() else None)
    return row


def read_epoch(path):
    columns = [c for c in ("similarity", "safe", "epoch", "poisoned") if c in pq.read_schema(path).names]
    table = pq.read_table(path, columns=columns)
    return {name: table[name].to_numpy(zero_copy_only=False) for name in columns}


def split_diagnostics(run_log_dir):
    """Per-epoch rows and the raw (similarity, poisoned) arrays for plotting."""
    rows, arrays = [], []
    for path in similarity_files(run_log_dir):
        table = read_epoch(path)
        if len(table["similarity"]) == 0:
            raise ValueError(f"{path}: empty similarity log")
        rows.append(epoch_row(table))
        arrays.append((table["similarity"], table.get("poisoned")))
    return rows, arrays


def plot_diagnostics(rows, arrays, out_dir):
    """similarity_epoch_NNN.png per epoch and safe_fraction.png; returns the written paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for row, (similarity, poisoned) in zip(rows, arrays):
        figure, axis = plt.subplots(figsize=(5, 3.2))
        bins = np.linspace(float(similarity.min()), float(similarity.max()) + 1e-6, 50)
        if poisoned is None:
            axis.hist(similarity, bins=bins, density=True, alpha=0.7, label="all samples")
        else:
            poisoned = poisoned.astype(bool)
            axis.hist(similarity[~poisoned], bins=bins, density=True, alpha=0.6, label="clean")
            if poisoned.any():
                axis.hist(similarity[poisoned], bins=bins, density=True, alpha=0.6, label="poisoned")
        threshold = None
        safe = row["safe"]
        if 0 < safe < row["samples"]:
            threshold = float(np.sort(similarity)[::-1][safe - 1])
            axis.axvline(threshold, color="k", linestyle="--", linewidth=1, label="safe cut")
        axis.set_xlabel("image-text cosine similarity")
        axis.set_ylabel("density")
        axis.set_title(f"epoch {row['epoch']}: safe {row['safe_fraction']:.0%}")
        axis.legend(fontsize=8)
        figure.tight_layout()
        path = os.path.join(out_dir, f"similarity_epoch_{row['epoch']:03d}.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)

    figure, axis = plt.subplots(figsize=(5, 3.2))
    epochs = [row["epoch"] for row in rows]
    axis.plot(epochs, [row["safe_fraction"] for row in rows], marker="o", label="safe fraction")
    axis.set_xlabel("epoch")
    axis.set_ylabel("safe fraction")
    axis.set_ylim(0, 1.05)
    if rows[0]["poisoned"] is not None:
        twin = axis.twinx()
        twin.plot(epochs, [row["poisoned_in_safe"] for row in rows], color="tab:red", marker="x",
                  label="poisoned in safe set")
        twin.set_ylabel("poisoned samples in safe set", color="tab:red")
        twin.set_ylim(bottom=0)
    axis.set_title("SafeCLIP split over epochs")
    figure.tight_layout()
    path = os.path.join(out_dir, "safe_fraction.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    written.append(path)
    return written


def diagnostics_table(rows):
    """A fixed-width text table, one line per epoch."""
    header = ("epoch", "samples", "safe", "safe %", "poisoned", "in safe", "risky recall", "risky prec.")
    lines = [header]
    for row in rows:
        lines.append((str(row["epoch"]), str(row["samples"]), str(row["safe"]), percent(row["safe_fraction"]),
                      "-" if row["poisoned"] is None else str(row["poisoned"]),
                      "-" if row["poisoned_in_safe"] is None else str(row["poisoned_in_safe"]),
                      percent(row["risky_recall"]), percent(row["risky_precision"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)
