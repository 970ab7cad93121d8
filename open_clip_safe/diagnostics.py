"""Split diagnostics from a SafeCLIP run's per-epoch similarity logs (no peer reports these).

For every mixed epoch: how many poisoned samples reached the safe set (the defense needs 0), how
well the risky set catches them (recall, precision), and the split as a detector: the ROC AUC of
its ranking for poisoned against clean samples and its true-positive rate at 1% and 5% false
positives, for all poisons and per kind. Plots: similarity histograms of clean vs poisoned
samples, the safe fraction and the AUC over epochs. The run itself logs the same detector figures
(train.mixed_epoch), from the same function.
"""
import glob
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from open_clip_safe.cli import percent
from open_clip_safe.data import POISON_KINDS
from open_clip_safe.similarity import SOURCE_KEY

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


DETECTED_KINDS = ("backdoor", "targeted")
FALSE_POSITIVE_RATES = (0.01, 0.05)


def split_order(score, tiebreak):
    """Each sample's place in the split's ranking, 0 the riskiest: by score, ties by the tie-break,
    then by position, as the split (schedule.top_fraction_mask) ranks them."""
    order = np.lexsort((-np.arange(len(score)), tiebreak, score))
    place = np.empty(len(order), dtype=np.int64)
    place[order] = np.arange(len(order))
    return place


def detector_metrics(score, tiebreak, poison):
    """The split as a detector of poisoned samples (ranked riskiest first), for all poisons and per
    kind: ROC AUC and the true-positive rate at each of FALSE_POSITIVE_RATES. `poison` holds the
    pass's codes (-1 unknown, else an index into data.POISON_KINDS); None where no sample is known."""
    from sklearn.metrics import roc_auc_score, roc_curve  # here: scikit-learn takes seconds to import

    poison = np.asarray(poison)
    clean = poison == 0
    if not clean.any() or not (poison > 0).any():
        return None
    risk = -split_order(np.asarray(score), np.asarray(tiebreak))
    metrics = {}
    groups = [("all", poison > 0)] + [(kind, poison == POISON_KINDS.index(kind)) for kind in DETECTED_KINDS]
    for name, members in groups:
        if not members.any():
            metrics[name] = None
            continue
        chosen = clean | members
        truth, ranked = members[chosen], risk[chosen]
        fpr, tpr, _ = roc_curve(truth, ranked)
        metrics[name] = {"samples": int(members.sum()), "auc": float(roc_auc_score(truth, ranked)),
                         **{f"tpr_at_{round(100 * rate)}": float(tpr[np.searchsorted(fpr, rate, side="right") - 1])
                            for rate in FALSE_POSITIVE_RATES}}
    return metrics


def detector_line(metrics):
    """One log line's worth of `detector_metrics`."""
    main = metrics["all"]
    kinds = ", ".join(f"{kind} {metrics[kind]['auc']:.3f}" for kind in DETECTED_KINDS if metrics[kind])
    return (f"split as a poison detector: ROC AUC {main['auc']:.3f}" + (f" ({kinds})" if kinds else "")
            + "; TPR " + ", ".join(f"{percent(main[f'tpr_at_{round(100 * r)}'])} at {r:.0%} FPR"
                                   for r in FALSE_POSITIVE_RATES))


def poison_codes(table):
    """The pass's poison codes back from a log's `poisoned` and `poison_kind` columns."""
    poisoned = table["poisoned"].astype(bool)
    codes = np.where(poisoned, POISON_KINDS.index("other"), 0).astype(np.int8)
    if "poison_kind" in table:
        for index, kind in enumerate(POISON_KINDS):
            codes[poisoned & (table["poison_kind"] == kind)] = index
    return codes


def epoch_row(table):
    """One epoch's counts; poisoned-sample figures are None when the data carried no poison flags."""
    similarity = table["similarity"]
    safe = table["safe"].astype(bool)
    row = {"epoch": int(table["epoch"][0]), "source": table.get("source", "pass"), "samples": len(safe),
           "safe": int(safe.sum()),
           "safe_fraction": ratio(safe.sum(), len(safe)), "mean_similarity": float(similarity.mean()),
           "poisoned": None, "poisoned_in_safe": None, "risky_recall": None, "risky_precision": None,
           "mean_similarity_clean": None, "mean_similarity_poisoned": None, "detector": None,
           "clean_moved_to_risky": None}
    if "poisoned" in table:
        poisoned = table["poisoned"].astype(bool)
        risky = ~safe
        row.update(poisoned=int(poisoned.sum()), poisoned_in_safe=int((poisoned & safe).sum()),
                   risky_recall=ratio((poisoned & risky).sum(), poisoned.sum()),
                   risky_precision=ratio((poisoned & risky).sum(), risky.sum()),
                   mean_similarity_clean=float(similarity[~poisoned].mean()) if (~poisoned).any() else None,
                   mean_similarity_poisoned=float(similarity[poisoned].mean()) if poisoned.any() else None)
        ranking = table.get("score", table.get("clean_prob"))  # score: where a second signal ranked
        if ranking is not None:
            row["detector"] = detector_metrics(ranking, similarity, poison_codes(table))
        if "score" in table and "clean_prob" in table:
            row["clean_moved_to_risky"] = clean_moved_to_risky(table["clean_prob"], similarity, safe, poisoned)
    return row


def clean_moved_to_risky(clean_prob, similarity, safe, poisoned):
    """What a second signal cost: the clean samples it moved out of the safe set the mixture alone
    would have chosen at the same size."""
    alone = split_order(clean_prob, similarity) >= len(safe) - int(safe.sum())
    return int((alone & ~safe & ~poisoned).sum())


def read_epoch(path):
    wanted = ("similarity", "clean_prob", "score", "safe", "epoch", "poisoned", "poison_kind")
    schema = pq.read_schema(path)
    columns = [c for c in wanted if c in schema.names]
    table = pq.read_table(path, columns=columns)
    if "poison_kind" in table.column_names:  # decoded first: a dictionary's nulls do not survive to_numpy
        kinds = table["poison_kind"].combine_chunks()
        if pa.types.is_dictionary(kinds.type):
            kinds = kinds.dictionary_decode()
        table = table.set_column(table.column_names.index("poison_kind"), "poison_kind", kinds)
    source = (schema.metadata or {}).get(SOURCE_KEY.encode(), b"pass").decode()  # logs before fast mode: a pass
    return {"source": source, **{name: table[name].to_numpy(zero_copy_only=False) for name in columns}}


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

    if any(row["detector"] for row in rows):
        figure, axis = plt.subplots(figsize=(5, 3.2))
        for name in ("all",) + DETECTED_KINDS:
            points = [(row["epoch"], row["detector"][name]["auc"]) for row in rows
                      if row["detector"] and row["detector"].get(name)]
            if points:
                axis.plot(*zip(*points), marker="o", label="all poisons" if name == "all" else name)
        axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel("epoch")
        axis.set_ylabel("ROC AUC, poisoned vs clean")
        axis.set_ylim(0, 1.02)
        axis.set_title("the split as a poison detector")
        axis.legend(fontsize=8)
        figure.tight_layout()
        path = os.path.join(out_dir, "detector_auc.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def detector_cell(row, name, field="auc"):
    found = (row["detector"] or {}).get(name)
    if not found:
        return "-"
    return f"{found[field]:.3f}" if field == "auc" else percent(found[field])


def diagnostics_table(rows):
    """A fixed-width text table, one line per epoch."""
    header = ("epoch", "similarity", "samples", "safe", "safe %", "poisoned", "in safe", "risky recall", "risky prec.", "AUC",
              "AUC bd", "AUC tg", "TPR@1%", "TPR@5%", "clean moved")
    lines = [header]
    for row in rows:
        lines.append((str(row["epoch"]), row.get("source", "pass"), str(row["samples"]), str(row["safe"]), percent(row["safe_fraction"]),
                      "-" if row["poisoned"] is None else str(row["poisoned"]),
                      "-" if row["poisoned_in_safe"] is None else str(row["poisoned_in_safe"]),
                      percent(row["risky_recall"]), percent(row["risky_precision"]),
                      detector_cell(row, "all"), detector_cell(row, "backdoor"), detector_cell(row, "targeted"),
                      detector_cell(row, "all", "tpr_at_1"), detector_cell(row, "all", "tpr_at_5"),
                      "-" if row["clean_moved_to_risky"] is None else str(row["clean_moved_to_risky"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)
