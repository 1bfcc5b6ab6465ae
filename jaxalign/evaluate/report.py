"""The quickstart's report: one page (report.md) and one JSON (report.json) over a run directory.

    write_report("out", wall_seconds=812)       # `jaxalign evaluate report --out out`

It only reads what the other commands wrote under the run dir:

    judge_<policy>/judge.json        the exact judge per policy (`jaxalign evaluate judge`)
    arena/arena.json                 the arena (`jaxalign arena`)
    <run>/metrics.jsonl              RL runs (curves summary, in-loop eval/* records)
    eval_reward|eval_cost/metrics.json   reward / cost model accuracy (`jaxalign evaluate reward|cost`)
    rl_curves.png                    `jaxalign evaluate curves`

and writes report.md, report.json, judge_table.png (the judge's rates per policy) and
rl_eval.png (the in-loop evaluation per RL run, when there is one).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np

from jaxalign import files
from jaxalign.evaluate import curves, judge
from jaxalign.train.metrics import read_metrics

# policy dir suffix -> label, in table order (other judge_* dirs follow, by name)
KNOWN = {"sft": "SFT", "ppo_lag": "PPO-Lagrangian", "ppo": "PPO", "ppo_reward_shaping": "reward shaping"}
EVAL_KEYS = ("eval/reward", "eval/cost", "eval/judge/harmful_rate", "eval/judge/helpful_rate")


def _load(path: pathlib.Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def collect(out_dir) -> dict[str, Any]:
    """Everything the report shows, from the files under out_dir."""
    out = pathlib.Path(out_dir)
    names = [p.name[len("judge_"):] for p in sorted(out.glob("judge_*")) if (p / "judge.json").exists()]
    names = [n for n in KNOWN if n in names] + [n for n in names if n not in KNOWN]
    judges = {}
    for name in names:
        rates = _load(out / f"judge_{name}" / "judge.json")
        judges[KNOWN.get(name, name)] = rates
    runs = {}
    for name in KNOWN:
        workdir = out / f"{name}_tiny"
        if name != "sft" and (workdir / "metrics.jsonl").exists():
            records = read_metrics(workdir)
            train = [r for r in records if "reward" in r]
            evals = [r for r in records if any(k.startswith("eval/") for k in r)]
            runs[KNOWN[name]] = {"workdir": str(workdir), "summary": curves.summarize(train),
                                 "eval": evals, "last_eval": evals[-1] if evals else {}}
    return {"judge": judges, "arena": _load(out / "arena" / "arena.json"), "rl": runs,
            "reward_model": _load(out / "eval_reward" / "metrics.json"),
            "cost_model": _load(out / "eval_cost" / "metrics.json")}


def _judge_table(judges: dict[str, dict]) -> list[str]:
    keys = judge.RATE_KEYS
    lines = ["| policy | " + " | ".join(k.replace("_rate", "").replace("_", " ") for k in keys) + " | answers |",
             "|---|" + "---|" * (len(keys) + 1)]
    for name, rates in judges.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(rates.get(k), pct=True) for k in keys)
                     + f" | {rates.get('num_answers', '')} |")
    return lines


def _arena_table(arena: dict) -> list[str]:
    lines = [f"Red corner: **{arena['red']}**; {arena['num_prompts']} answers per policy. Safe = cost <= 0.", "",
             "| policy | mean reward | mean cost | safe (cost model) | harmful (judge) | helpful (judge) |",
             "|---|---|---|---|---|---|"]
    for name in arena.get("order", list(arena["policies"])):
        entry = arena["policies"][name]
        rates = entry.get("judge", {})
        lines.append(f"| {name} | {_fmt(entry['reward_mean'])} | {_fmt(entry['cost_mean'])} | "
                     f"{_fmt(entry['safe_rate'], True)} | {_fmt(rates.get('harmful_rate'), True)} | "
                     f"{_fmt(rates.get('helpful_rate'), True)} |")
    lines += ["", "| blue vs red | helpfulness win | harmlessness win | judge harmlessness win | better & safe | "
              "better & unsafe | worse & safe | worse & unsafe | 2x2 (red safe/unsafe x blue safe/unsafe: n, blue win) |",
              "|---|---|---|---|---|---|---|---|---|"]
    pairs = [f"{arena['red']}_vs_{name}" for name in arena.get("order", [])[1:]] or list(arena["pairs"])
    for pair in pairs:
        t = arena["pairs"][pair]
        c = t["blue_counts"]
        cells = "; ".join(f"{r.split('_')[1]}/{b.split('_')[1]}: {t['table2x2'][r][b]['count']}, "
                          f"{_fmt(t['table2x2'][r][b]['blue_win_rate'], True)}"
                          for r in ("red_safe", "red_unsafe") for b in ("blue_safe", "blue_unsafe"))
        lines.append(f"| {pair} | {_fmt(t['helpfulness_win_rate'], True)} | {_fmt(t['harmlessness_win_rate'], True)} | "
                     f"{_fmt(t.get('judge_harmlessness_win_rate'), True)} | {c['better_safe']} | {c['better_unsafe']} | "
                     f"{c['worse_safe']} | {c['worse_unsafe']} | {cells} |")
    return lines


def plot_rl_eval(runs: dict[str, dict], out_png) -> bool:
    """One panel per EVAL_KEYS entry, one line per RL run (in-loop evaluation). -> written?"""
    if not any(run["eval"] for run in runs.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(EVAL_KEYS), figsize=(4.2 * len(EVAL_KEYS), 3.4))
    for ax, key in zip(axes, EVAL_KEYS):
        for label, run in runs.items():
            points = [(r["step"], r[key]) for r in run["eval"] if key in r]
            if points:
                ax.plot(*np.asarray(points).T, marker="o", label=label)
        ax.set_title(key)
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with files.atomic_file(out_png, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return True


REPORT_FILES = ("report.md", "report.json")  # + judge_table.png and rl_eval.png when there is data for them


def write_report(out_dir, wall_seconds: float | None = None) -> dict[str, Any]:
    """OUT/report.md, OUT/report.json, OUT/judge_table.png, OUT/rl_eval.png. -> the report.json content."""
    out = pathlib.Path(out_dir)
    data = collect(out)
    data["wall_seconds"] = wall_seconds
    lines = ["# Safe RLHF quickstart report", ""]
    if wall_seconds is not None:
        lines += [f"Wall time of the run: {wall_seconds / 60:.1f} min.", ""]
    if data["judge"]:
        with files.atomic_file(out / "judge_table.png", overwrite=True) as tmp:
            judge.plot_judge(data["judge"], tmp)
        lines += ["## The exact judge (mini test prompts)", "",
                  "harmful / severe / safe alternative / refusal: share of answers to harmful prompts; helpful / "
                  "over-refusal: share of answers to benign prompts; broken: answers that are no response of the "
                  "dataset.", ""] + _judge_table(data["judge"]) + ["", "![judge](judge_table.png)", ""]
    if data["rl"]:
        lines += ["## RL runs", "", "| run | reward first → last | cost first → last | λ last | "
                  + " | ".join(EVAL_KEYS) + " (last in-loop eval) |", "|---|---|---|---|" + "---|" * len(EVAL_KEYS)]
        for label, run in data["rl"].items():
            s = run["summary"]
            lines.append(f"| {label} | {_fmt(s.get('reward_first'))} → {_fmt(s.get('reward_last'))} | "
                         f"{_fmt(s.get('cost_first'))} → {_fmt(s.get('cost_last'))} | {_fmt(s.get('lambda_last'))} | "
                         + " | ".join(_fmt(run["last_eval"].get(k)) for k in EVAL_KEYS) + " |")
        lines += ["", "![RL curves](rl_curves.png)", ""]
        if plot_rl_eval(data["rl"], out / "rl_eval.png"):
            lines += ["![in-loop evaluation](rl_eval.png)", ""]
    if data["arena"]:
        lines += ["## Arena", ""] + _arena_table(data["arena"]) + ["", "![arena](arena/arena.png)", ""]
    for kind in ("reward_model", "cost_model"):
        if data[kind]:
            shown = {k: v for k, v in data[kind].items() if isinstance(v, float)}
            lines += [f"## {kind.replace('_', ' ')} (test pairs)", "",
                      ", ".join(f"{k} {v:.3f}" for k, v in sorted(shown.items())), "",
                      f"![{kind}](eval_{kind.split('_')[0]}/distribution.png)", ""]
    files.write_text(out / "report.md", "\n".join(lines) + "\n")
    for run in data["rl"].values():
        run.pop("eval")
    files.write_text(out / "report.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data
