"""Reward / cost model evaluation on preference pairs: end scores, metrics, files
(the metrics and files of safe-rlhf's safe_rlhf/evaluate/reward.py and cost.py).

    arrays, _ = pipeline.tokenize_examples("preference", examples, tokenizer, max_length=512)
    first, second = make_pair_scorer(module, mesh, rules)(params, arrays, "preference", batch_size=16)
    metrics = reward_metrics(first, second)            # accuracy, reward_mean, reward_std, ...
    write_reward_outputs(out_dir, first, second, metrics)

`first`/`second` are the end scores [N] of the two sides of each pair: better/worse for
"preference", safer/unsafer for "safety_preference". The same functions compute the score
stage's eval metrics, so `jaxalign evaluate` and training report identical numbers.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxalign.objectives.preference import concat_pair, pair_sides
from jaxalign.parallel import mesh as mesh_lib

def make_pair_scorer(module, mesh: jax.sharding.Mesh, rules):
    """A scorer of pair arrays with one jitted forward (compiled once per shape):

    scorer(params, arrays, kind, batch_size=, max_batches=-1) -> (first [n], second [n]) fp32,
    the end scores of both sides of every pair of `arrays` (tokenize_examples output, N pairs),
    n = N or fewer when max_batches >= 0. The last batch is completed with copies of the last pair
    (dropped from the result), so every pair is scored exactly once at one static shape.
    """
    in_sharding = mesh_lib.batch_sharding(mesh, 2)
    forward = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, attention_mask=mask).end_scores[:, 0],
                      out_shardings=mesh_lib.replicated(mesh))

    def scorer(params, arrays: dict[str, np.ndarray], kind: str, *, batch_size: int,
               max_batches: int = -1) -> tuple[np.ndarray, np.ndarray]:
        a, _ = pair_sides(kind)
        total = len(arrays[f"{a}_input_ids"])
        num_batches = -(-total // batch_size)
        if max_batches >= 0:
            num_batches = min(num_batches, max_batches)
        first, second = [], []
        with mesh_lib.sharding_context(mesh, rules):
            for i in tqdm.trange(num_batches, desc=f"score {kind} pairs", unit="batch", leave=False,
                                 disable=jax.process_index() != 0):
                rows = np.minimum(np.arange(i * batch_size, (i + 1) * batch_size), total - 1)
                ids, mask = concat_pair({k: v[rows] for k, v in arrays.items()}, kind)
                scores = forward(params, mesh_lib.put_sharded(ids, in_sharding), mesh_lib.put_sharded(mask, in_sharding))
                scores = np.asarray(jax.device_get(scores), np.float32)
                keep = min(batch_size, total - i * batch_size)
                first.append(scores[:batch_size][:keep])
                second.append(scores[batch_size:][:keep])
        return np.concatenate(first), np.concatenate(second)

    scorer.forward = forward  # (params, ids [2B, L], mask) -> end scores: the step jaxalign.plan compiles
    return scorer


def reward_metrics(better: np.ndarray, worse: np.ndarray) -> dict[str, float]:
    """accuracy = P(r_better > r_worse); mean/std (unbiased) over all 2N rewards."""
    rewards = np.concatenate([better, worse]).astype(np.float64)
    return {
        "accuracy": float(np.mean(better > worse)),
        "reward_mean": float(np.mean(rewards)),
        "reward_std": float(np.std(rewards, ddof=1)) if rewards.size > 1 else 0.0,
        "better_mean": float(np.mean(better)),
        "worse_mean": float(np.mean(worse)),
        "num_pairs": int(better.size),
    }


def cost_metrics(
    safer: np.ndarray, unsafer: np.ndarray, safer_sign: np.ndarray, unsafer_sign: np.ndarray
) -> dict[str, float]:
    """accuracy = P(c_unsafer > c_safer); accuracy_sign = P(cost·safety_sign < 0) over the 2N
    responses (safety sign +1 safe, -1 unsafe); cost mean/std and the mean cost of the safe and
    unsafe responses."""
    costs = np.concatenate([safer, unsafer]).astype(np.float64)
    signs = np.concatenate([safer_sign, unsafer_sign])
    safe, unsafe = costs[signs > 0], costs[signs < 0]
    return {
        "accuracy": float(np.mean(unsafer > safer)),
        "accuracy_sign": float(np.mean(costs * signs < 0)),
        "cost_mean": float(np.mean(costs)),
        "cost_std": float(np.std(costs, ddof=1)) if costs.size > 1 else 0.0,
        "safe_cost_mean": float(np.mean(safe)) if safe.size else float("nan"),
        "unsafe_cost_mean": float(np.mean(unsafe)) if unsafe.size else float("nan"),
        "num_pairs": int(safer.size),
        "num_safe": int(safe.size),
        "num_unsafe": int(unsafe.size),
    }


def pair_metrics(kind: str, first: np.ndarray, second: np.ndarray, arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """reward_metrics for preference pairs, cost_metrics (with the signs in `arrays`) for safety pairs."""
    if kind == "preference":
        return reward_metrics(first, second)
    n = first.size
    return cost_metrics(first, second, arrays["safer_sign"][:n], arrays["unsafer_sign"][:n])


# ---------------------------------------------------------------------------------------
# Files


def _histogram(path: pathlib.Path, values: np.ndarray, title: str, xlabel: str, value_range=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(values, bins=100, range=value_range, color="tab:blue", alpha=0.8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_json(path: pathlib.Path, metrics: dict) -> None:
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def write_reward_outputs(out_dir, better: np.ndarray, worse: np.ndarray, metrics: dict) -> list[str]:
    """metrics.json, scores.npy (all 2N: better then worse) and distribution.png. -> file names."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = np.concatenate([better, worse])
    _write_json(out / "metrics.json", metrics)
    np.save(out / "scores.npy", scores)
    _histogram(out / "distribution.png", scores, "Reward distribution", "reward")
    return ["metrics.json", "scores.npy", "distribution.png"]


def write_cost_outputs(
    out_dir, safer: np.ndarray, unsafer: np.ndarray, safer_sign: np.ndarray, unsafer_sign: np.ndarray, metrics: dict
) -> list[str]:
    """metrics.json, scores.npy (all 2N: safer then unsafer), safe_scores.npy, unsafe_scores.npy
    and distribution.png, safe_distribution.png, unsafe_distribution.png; the safe/unsafe
    histograms share the overall min/max range (upstream). -> file names."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = np.concatenate([safer, unsafer])
    signs = np.concatenate([safer_sign, unsafer_sign])
    value_range = (float(scores.min()), float(scores.max())) if scores.size else None
    _write_json(out / "metrics.json", metrics)
    np.save(out / "scores.npy", scores)
    np.save(out / "safe_scores.npy", scores[signs > 0])
    np.save(out / "unsafe_scores.npy", scores[signs < 0])
    _histogram(out / "distribution.png", scores, "Cost distribution", "cost", value_range)
    _histogram(out / "safe_distribution.png", scores[signs > 0], "Cost of safe responses", "cost", value_range)
    _histogram(out / "unsafe_distribution.png", scores[signs < 0], "Cost of unsafe responses", "cost", value_range)
    return [
        "metrics.json", "scores.npy", "safe_scores.npy", "unsafe_scores.npy",
        "distribution.png", "safe_distribution.png", "unsafe_distribution.png",
    ]
