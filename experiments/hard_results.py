"""The hard variant's results over seeds: one table (mean ± std) and the helpfulness-harmlessness plane.

    python experiments/hard_results.py --dir out/hard --seeds 0 1 2 --methods sft ppo ppo_lag ... --nus 0.1 0.5 2 5

Reads DIR/seed<s>/judge_<method>/answers.jsonl (the answers `jaxalign evaluate judge` sampled; their
labels and per-slice rates are recomputed here with the current jaxalign.evaluate.judge, so every
method is judged by the same rules), DIR/seed<s>/<method>_tiny/{config.json,metrics.jsonl} (the iteration at which a constrained
RL run's episode cost first meets its threshold) and DIR/times.txt (GNU time lines `TIME DIR/seed<s>/<method> <wall s> s <peak KB> KB`, written by
experiments/hard.sh). The nu front is the reward-shaping runs shaping_nu<nu> plus ppo_reward_shaping
(nu = 1). Writes DIR/results.md, DIR/results.json (per seed and mean/std) and DIR/plane.png. The std
is the sample standard deviation over the seeds (ddof = 1; 0 with one seed).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np

from compare_methods import read_times  # experiments/ is the script's folder: the one reader of GNU time lines

LABELS = {"sft": "SFT", "ppo": "PPO (reward only)", "ppo_lag": "PPO-Lagrangian", "ppo_reward_shaping":
          "reward shaping ν = 1", "safe_grpo": "Safe GRPO", "dpo": "DPO", "safe_dpo": "SafeDPO", "c_dpo": "C-DPO",
          "multi_lag": "multi-constraint Lagrangian", "ppo_lag_moderation": "moderation cost, per token",
          "ppo_lag_moderation_end": "moderation cost, end of answer"}
# column -> (header, how to read it from a judge.json)
COLUMNS = {
    "harmful_in_distribution": ("harmful (in-dist.) ↓", lambda j: j["slices"]["in_distribution"]["harmful_rate"]),
    "harmful_held_out": ("harmful (held-out phrasing) ↓", lambda j: j["slices"]["held_out_phrasing"]["harmful_rate"]),
    "severe": ("severe ↓", lambda j: j["severe_rate"]),
    "lookalike_over_refusal": ("look-alike over-refusal ↓", lambda j: j["slices"]["lookalike"]["over_refusal_rate"]),
    "lookalike_helpful": ("look-alike helpful ↑", lambda j: j["slices"]["lookalike"]["helpful_rate"]),
    "helpful": ("benign helpful ↑", lambda j: j["helpful_rate"]),
    "broken": ("broken", lambda j: _pooled(j, "broken_rate")),
    "late_continued": ("opened → harm", lambda j: j["slices"]["late_turning"]["continued_rate"]),
    "late_stopped": ("opened → stopped", lambda j: j["slices"]["late_turning"]["stopped_rate"]),
}
# Not rates: read from the run's files (experiments/hard.sh's times.txt and WORKDIR/metrics.jsonl).
EXTRA = {"constraint_met_at": "constraint met at iteration", "wall_s": "train wall s"}


def _pooled(rates: dict, key: str) -> float:
    """A rate over every answer: the headline one (harmful and benign prompts) pooled with the look-alike slice."""
    look = rates["slices"].get("lookalike", {"num_answers": 0, key: 0.0})
    n = rates["num_answers"] + look["num_answers"]
    return (rates[key] * rates["num_answers"] + look[key] * look["num_answers"]) / n


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _thresholds(config: dict) -> dict[str, float]:
    """{episode-cost metric: threshold} of a constrained RL run's config.json: "episode_cost" of
    ppo_lag / safe_grpo (rl.<stage>.threshold, or rl.threshold in runs from before the per-algorithm
    groups), "episode_cost/<name>" per multi_lag constraint ("name<=threshold[;key=value]", comma-joined)."""
    rl = config.get("rl", {})
    group = rl.get(config.get("stage", ""), {})
    constraints = group.get("constraints", rl.get("constraints", "")) if isinstance(group, dict) else ""
    if constraints:
        pairs = (part.split(";")[0].split("<=") for part in constraints.split(","))
        return {f"episode_cost/{name.strip()}": float(value) for name, value in pairs}
    threshold = group.get("threshold", rl.get("threshold")) if isinstance(group, dict) else rl.get("threshold")
    return {} if threshold is None else {"episode_cost": float(threshold)}


def constraint_met_at(workdir: pathlib.Path) -> float:
    """The first iteration whose episode costs (the window means lambda compares) are all at most
    their thresholds; NaN when the run has none (unconstrained) or never meets them."""
    from jaxalign.train.metrics import read_metrics

    config = workdir / "config.json"
    thresholds = _thresholds(json.loads(config.read_text())) if config.exists() else {}
    if not thresholds:
        return float("nan")
    for record in read_metrics(workdir):
        if all(key in record and record[key] <= value for key, value in thresholds.items()):
            return float(record["step"])
    return float("nan")


def judged(path: pathlib.Path) -> dict:
    """judge.judge_rates of an answers.jsonl (prompt, answer per line), labels recomputed."""
    from jaxalign.evaluate import judge

    records = [json.loads(line) for line in path.read_text().splitlines()]
    prompts, texts = [r["prompt"] for r in records], [r["answer"] for r in records]
    return judge.judge_rates(prompts, [judge.classify(t, p) for t, p in zip(texts, prompts)], texts)


def collect(directory: pathlib.Path, seeds: list[str], names: list[str], times: dict) -> dict[str, dict]:
    """{name: {"per_seed": {seed: {column: value}}, "mean": {...}, "std": {...}}} over the judged answers."""
    results = {}
    for name in names:
        per_seed = {}
        for seed in seeds:
            path = directory / f"seed{seed}" / f"judge_{name}" / "answers.jsonl"
            if not path.exists():
                raise FileNotFoundError(f"{path}: no judge result for {name}, seed {seed} (run experiments/hard.sh)")
            rates = judged(path)
            values = {column: float(read(rates)) for column, (_, read) in COLUMNS.items()}
            values["wall_s"] = times.get(f"{directory}/seed{seed}/{name}", (float("nan"),))[0]
            values["constraint_met_at"] = constraint_met_at(directory / f"seed{seed}" / f"{name}_tiny")
            per_seed[seed] = values
        keys = list(COLUMNS) + list(EXTRA)
        stats = {key: _mean_std([per_seed[s][key] for s in seeds]) for key in keys}
        results[name] = {"per_seed": per_seed, "mean": {k: v[0] for k, v in stats.items()},
                         "std": {k: v[1] for k, v in stats.items()}}
    return results


def _cell(result: dict, key: str, pct: bool = True) -> str:
    """mean ± std; "(k/n seeds)" when only k of the n seeds have a value (e.g. met the constraint)."""
    mean, std = result["mean"][key], result["std"][key]
    if math.isnan(mean):
        return "–"
    cell = f"{100 * mean:.1f} ± {100 * std:.1f}" if pct else f"{mean:.0f} ± {std:.0f}"
    values = [seed[key] for seed in result["per_seed"].values()]
    present = sum(not math.isnan(v) for v in values)
    return cell if present == len(values) else f"{cell} ({present}/{len(values)} seeds)"


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| method | " + " | ".join(header for header, _ in COLUMNS.values()) + " | "
             + " | ".join(EXTRA.values()) + " |", "|---|" + "---|" * (len(COLUMNS) + len(EXTRA))]
    for name, result in results.items():
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(_cell(result, key) for key in COLUMNS) + " | "
                     + " | ".join(_cell(result, key, pct=False) for key in EXTRA) + " |")
    return lines


def plot(methods: dict[str, dict], front: list[tuple[float, dict]], path: pathlib.Path, seeds: list[str]) -> None:
    """Two panels, mean ± std per method: benign helpfulness vs harmlessness (1 - harmful) on the
    in-distribution prompts, and look-alike helpfulness vs harmlessness on the held-out phrasings; the
    reward-shaping nu front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("helpful", "harmful_in_distribution", "benign helpfulness", "harmlessness, in-distribution prompts"),
              ("lookalike_helpful", "harmful_held_out", "look-alike helpfulness (benign requests, harmful words)",
               "harmlessness, held-out phrasings")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, (x_key, y_key, x_label, y_label) in zip(axes, panels):
        for i, (name, result) in enumerate(methods.items()):
            x, y = result["mean"][x_key], 1 - result["mean"][y_key]
            ax.errorbar([x], [y], xerr=[result["std"][x_key]], yerr=[result["std"][y_key]], fmt="o", capsize=3,
                        color=f"C{i % 10}", label=LABELS.get(name, name))
            ax.annotate(LABELS.get(name, name), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if front:
            xs = [r["mean"][x_key] for _, r in front]
            ys = [1 - r["mean"][y_key] for _, r in front]
            ax.errorbar(xs, ys, xerr=[r["std"][x_key] for _, r in front], yerr=[r["std"][y_key] for _, r in front],
                        fmt="--", color="gray", alpha=0.7, capsize=2, label="reward shaping ν front")
            for nu, x, y in zip([nu for nu, _ in front], xs, ys):
                ax.annotate(f"ν={nu:g}", (x, y), textcoords="offset points", xytext=(-10, -12), fontsize=7,
                            color="gray")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"hard variant of mini: mean ± std over {len(seeds)} seed(s), exact judge")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="experiments/hard.sh's OUT")
    parser.add_argument("--seeds", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--nus", nargs="*", default=[], help="the reward-shaping front's nu (runs shaping_nu<nu>)")
    args = parser.parse_args(argv)
    directory = pathlib.Path(args.dir)
    times = read_times(directory / "times.txt")
    methods = collect(directory, args.seeds, args.methods, times)
    shaping = collect(directory, args.seeds, [f"shaping_nu{nu}" for nu in args.nus], times)
    front = sorted([(float(nu), shaping[f"shaping_nu{nu}"]) for nu in args.nus]
                   + ([(1.0, methods["ppo_reward_shaping"])] if "ppo_reward_shaping" in methods else []),
                   key=lambda item: item[0])
    lines = [f"Seeds {', '.join(args.seeds)}; mean ± std (percent of answers; wall time in seconds).", ""]
    lines += table(methods)
    if front:
        lines += ["", "Reward shaping R − ν·C, the ν front:", ""]
        lines += table({f"ν = {nu:g}": result for nu, result in front})
    (directory / "results.md").write_text("\n".join(lines) + "\n")
    (directory / "results.json").write_text(json.dumps(
        {"seeds": args.seeds, "methods": methods, "front": [{"nu": nu, **result} for nu, result in front]},
        indent=1) + "\n")
    plot(methods, front, directory / "plane.png", args.seeds)
    print((directory / "results.md").read_text())
    print(f"wrote {directory}/results.md, results.json and plane.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
