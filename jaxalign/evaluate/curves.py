"""Training curves of RL runs: reward, cost, lambda and KL per iteration, side by side.

Reads WORKDIR/metrics.jsonl of each run (written by the RL loop) and draws one panel per metric,
one line per run, smoothed with a trailing moving average; the summary compares the mean of the
first and last `window` iterations, the numbers the Safe RLHF trade-off is judged by.
"""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np

from jaxalign import files
from jaxalign.train.metrics import read_metrics

CURVE_KEYS = ("reward", "cost", "lambda", "kl_divergence")


def load_runs(workdirs: list[str], labels: list[str] | None = None) -> dict[str, list[dict]]:
    """{label: metrics records} for each run dir; a dir without metrics.jsonl is an error."""
    labels = labels or [pathlib.Path(w).name for w in workdirs]
    if len(labels) != len(workdirs):
        raise ValueError(f"--labels: {len(labels)} labels for {len(workdirs)} runs")
    runs = {}
    for label, workdir in zip(labels, workdirs):
        records = read_metrics(workdir)
        if not records:
            raise FileNotFoundError(f"{workdir}/metrics.jsonl: missing or empty (is this an RL run dir?)")
        runs[label] = records
    return runs


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [N], values [N]) of `key` over the records that have it."""
    points = [(r["step"], r[key]) for r in records if key in r]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` points: [N] -> [N]."""
    if window <= 1 or len(values) == 0:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def summarize(records: list[dict], window: int = 10) -> dict[str, float]:
    """Mean reward/cost over the first and last `window` iterations, and the final lambda."""
    summary = {"iterations": len(records)}
    for key in ("reward", "cost"):
        _, values = series(records, key)
        if len(values):
            summary[f"{key}_first"] = float(values[:window].mean())
            summary[f"{key}_last"] = float(values[-window:].mean())
    _, lambdas = series(records, "lambda")
    if len(lambdas):
        summary["lambda_max"] = float(lambdas.max())
        summary["lambda_last"] = float(lambdas[-1])
    return summary


def plot_curves(runs: dict[str, list[dict]], out_png: str | pathlib.Path, smooth: int = 10,
                threshold: float | None = None) -> None:
    """One panel per CURVE_KEYS entry, one line per run, to a PNG (cost threshold dashed if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(4.2 * len(CURVE_KEYS), 3.4))
    for ax, key in zip(axes, CURVE_KEYS):
        for label, records in runs.items():
            steps, values = series(records, key)
            if len(values):
                ax.plot(steps, moving_average(values, smooth), label=label)
        if key == "cost" and threshold is not None:
            ax.axhline(threshold, color="k", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(key if smooth <= 1 else f"{key} (mean of last {smooth})")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    with files.atomic_file(out_png, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_curves(workdirs: list[str], out_png: str | pathlib.Path, labels: list[str] | None = None,
                 smooth: int = 10, threshold: float | None = None) -> dict[str, dict[str, float]]:
    """Plots the runs to out_png, writes the first-vs-last summary per run beside it (.json); -> summary."""
    runs = load_runs(workdirs, labels)
    plot_curves(runs, out_png, smooth=smooth, threshold=threshold)
    summary = {label: summarize(records, window=smooth) for label, records in runs.items()}
    files.write_text(pathlib.Path(out_png).with_suffix(".json"), json.dumps(summary, indent=2))
    logging.info("wrote %s and %s", out_png, pathlib.Path(out_png).with_suffix(".json"))
    return summary
