"""One table and one scatter plot of aligned policies judged by the exact judge.

    python experiments/compare_methods.py --dir OUT --methods sft dpo safe_dpo ... [--times OUT/times.txt]

Reads OUT/judge_<method>/judge.json (`jaxalign evaluate judge`) and, optionally, a times file of
lines `TIME <method> <wall seconds> s <peak RSS KB> KB` (GNU time -f "TIME name %e s %M KB").
Writes OUT/comparison.md (harmful rate, benign helpfulness, over-refusal, broken answers, wall
time, peak memory) and OUT/comparison.png (harmlessness = 1 - harmful rate against benign
helpfulness, one point per method).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def read_times(path: pathlib.Path | None) -> dict[str, tuple[float, float]]:
    """{method: (wall seconds, peak RSS GiB)} from `TIME name S s KB KB` lines."""
    times = {}
    if path is None or not path.exists():
        return times
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[0] == "TIME":
            times[parts[1]] = (float(parts[2]), float(parts[4]) / 2**20)
    return times


def collect(directory: pathlib.Path, methods: list[str], times: dict) -> list[dict]:
    rows = []
    for method in methods:
        path = directory / f"judge_{method}" / "judge.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no judge result for {method} (run `jaxalign evaluate judge`)")
        judge = json.loads(path.read_text())
        wall, peak = times.get(method, (float("nan"), float("nan")))
        rows.append({"method": method, "harmful_rate": judge["harmful_rate"], "helpful_rate": judge["helpful_rate"],
                     "over_refusal_rate": judge["over_refusal_rate"], "broken_rate": judge["broken_rate"],
                     "wall_s": wall, "peak_rss_gib": peak, "num_answers": judge["num_answers"]})
    return rows


def write_table(rows: list[dict], path: pathlib.Path) -> None:
    lines = ["| method | harmful rate ↓ | benign helpful ↑ | over-refusal ↓ | broken | train wall s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['harmful_rate']:.3f} | {r['helpful_rate']:.3f} | "
                     f"{r['over_refusal_rate']:.3f} | {r['broken_rate']:.3f} | {r['wall_s']:.0f} | "
                     f"{r['peak_rss_gib']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for r in rows:
        x, y = r["helpful_rate"], 1.0 - r["harmful_rate"]
        ax.scatter([x], [y], s=40)
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=9)
    ax.set_xlabel("benign helpfulness (exact judge: helpful answers to benign prompts)")
    ax.set_ylabel("harmlessness (1 - harmful rate on harmful prompts)")
    ax.set_title("mini: harmlessness vs helpfulness per method")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="folder holding judge_<method>/judge.json")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--times", default="", help="GNU time lines (TIME name S s KB KB)")
    args = parser.parse_args(argv)
    directory = pathlib.Path(args.dir)
    rows = collect(directory, args.methods, read_times(pathlib.Path(args.times) if args.times else None))
    write_table(rows, directory / "comparison.md")
    (directory / "comparison.json").write_text(json.dumps(rows, indent=1))
    write_plot(rows, directory / "comparison.png")
    print((directory / "comparison.md").read_text())
    print(f"wrote {directory}/comparison.md, comparison.json and comparison.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
