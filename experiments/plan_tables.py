"""TPU plans of the paper-scale configs (docs/tpu.md), and the check of the 8B configs' planned peaks.

    python experiments/plan_tables.py [--out out/plan_tables.json] [--parts llama2,rl8b,configs] [--only NAME]

Every case is `jaxalign plan` (jaxalign/stages/planning.py) of a config on a TPU slice: the TPU
compiler's memory per chip, flops and roofline of each step the stage runs, from abstract inputs on
this machine (libtpu's compile-only devices; no TPU, nothing allocated).

  llama2   configs/{sft,reward,cost,ppo_lag}_llama2_7b.py on v4, v5e and v5p, at the chip counts the
           configs name (SFT 32, reward / cost 16; their train steps) and PPO-Lagrangian at 64 chips (fsdp 64), next to
           the old plans of XLA:CPU on a simulated mesh (OLD_CPU_GIB: the README's tables before the
           TPU compiler, experiments/benchmark_train.py / benchmark_rl.py at commit 5dc618b)
  rl8b     configs/ppo_lag_llama3_8b.py (Llama-3.1-8B, batch 128 x (128 + 384)) with a LoRA r16 actor
           (full critics) and without LoRA, on v5e-16, v5p-8 and v6e-8
  configs  every configs/*_{llama3,qwen3}_8b.py on the slice its "# planned:" comment names; the peaks
           of the fresh plan against the comment's (tests/test_plan.py checks one of them in the suite)
  tiny     every configs/*_tiny.py on v5e-4, every step compiled (the suite lowers their updates only)

Results are cached in --out by case name (a re-run compiles only missing cases; --only NAME redoes one).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 1024**3
GENERATIONS = ("v4", "v5e", "v5p")

# The old per-device peaks (GiB) of XLA:CPU plans on a simulated mesh, as the README tabled them
# before this plan existed: {case: {step: GiB}} (no entry = the README had no such row).
OLD_CPU_GIB = {
    "sft_llama2_7b": {"train": 6.5},  # fsdp 32
    "reward_llama2_7b": {"train": 14.9},  # fsdp 16
    "ppo_lag_llama2_7b": {"rollout": 3.8, "scoring": 4.3, "update": 9.9},  # fsdp 64
    "ppo_lag_llama3_8b lora16 v5e-16": {"rollout": 9.19, "scoring": 15.09, "update": 34.38},  # fsdp 16
}
LLAMA2_CHIPS = {"sft_llama2_7b": 32, "reward_llama2_7b": 16, "cost_llama2_7b": 16, "ppo_lag_llama2_7b": 64}
RL8B_SLICES = ("v5e-16", "v5p-8", "v6e-8")
LORA16 = ["--config.lora.rank=16", "--config.lora.alpha=32.0"]
PARTS = ("llama2", "rl8b", "configs", "tiny")
PLANNED = re.compile(r"^# planned: (\S+), peak GiB per chip: (.+)$", re.M)


def cases(parts: list[str]) -> list[tuple[str, str, str, list[str]]]:
    """(name, config file, topology, overrides) of every case of `parts`, in that order."""
    return [case for part in parts for case in _cases(part)]


def _cases(part: str) -> list[tuple[str, str, str, list[str]]]:
    from jaxalign.plan import chips

    if part not in PARTS:
        raise ValueError(f"--parts: unknown part {part!r}; valid: {', '.join(PARTS)}")
    out = []
    if part == "llama2":
        for config, count in LLAMA2_CHIPS.items():
            for generation in GENERATIONS:
                topology = chips.smallest_slices(chips.CHIPS[generation], count)[0]
                out.append((f"{config} {topology.name}", f"configs/{config}.py", topology.name,
                            [f"--config.mesh.fsdp={count}", "--config.mesh.data=1", "--config.mesh.tensor=1",
                             "--config.data.eval_split="]))  # the train step, as the old tables had it
    if part == "rl8b":
        for name, extra in (("lora16", LORA16), ("full", [])):
            for topology in RL8B_SLICES:
                out.append((f"ppo_lag_llama3_8b {name} {topology}", "configs/ppo_lag_llama3_8b.py", topology,
                            ["--config.mesh.fsdp=-1", *extra]))
    if part == "tiny":
        for path in sorted((REPO / "configs").glob("*_tiny.py")):
            out.append((f"{path.stem} v5e-4", f"configs/{path.name}", "v5e-4", []))
    if part == "configs":
        for path in sorted((REPO / "configs").glob("*_8b.py")):
            match = PLANNED.search(path.read_text())
            if match is None:
                continue
            out.append((f"{path.stem} (planned)", f"configs/{path.name}", match.group(1), []))
    return out


def planned_peaks(config_file: str) -> dict[str, float]:
    """{step: GiB} of a config's '# planned: TOPOLOGY, peak GiB per chip: train 12.34, eval 5.67' comment."""
    match = PLANNED.search((REPO / config_file).read_text())
    out = {}
    for item in match.group(2).split(",") if match else []:
        step, _, value = item.strip().partition(" ")
        try:
            out[step] = float(value)
        except ValueError:  # not planned yet
            pass
    return out


def run_case(config_file: str, topology_name: str, overrides: list[str]) -> dict:
    from jaxalign import config as config_lib
    from jaxalign.plan import chips
    from jaxalign.stages import planning

    topology = chips.topology(topology_name)
    config = config_lib.load_config(REPO / config_file, overrides)
    start, cpu = time.perf_counter(), time.process_time()
    _, _, plans = planning.plan_config(config, topology)
    return {"config": config_file, "topology": topology_name, "overrides": overrides,
            "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
            "steps": [p.to_json() for p in plans]}


def old_peaks(name: str) -> dict:
    base = name.split(" ")[0]
    return OLD_CPU_GIB.get(name) or (OLD_CPU_GIB.get(base, {}) if base.endswith("llama2_7b") else {})


def print_tables(results: dict) -> int:
    """Prints one line per case; returns the number of 8B configs whose comment's peak differs from the
    fresh plan by more than 0.01 GiB (or has no number for a step)."""
    mismatches = 0
    for name, r in results.items():
        old = old_peaks(name)
        planned = planned_peaks(r["config"]) if name.endswith("(planned)") else {}
        cells = []
        for s in r["steps"]:
            peak = s["peak_bytes"] / GIB
            text = f"{s['name']} {peak:.2f}{'' if s['fits'] else ' (no)'}"
            if s["name"] in old:
                text += f" [CPU {old[s['name']]:.2f}, {100 * (old[s['name']] - peak) / peak:+.0f}%]"
            if name.endswith("(planned)"):
                comment = planned.get(s["name"])
                ok = comment is not None and abs(comment - round(peak, 2)) <= 0.01
                mismatches += not ok
                text += f" [comment {'none' if comment is None else f'{comment:.2f}'}{'' if ok else ' MISMATCH'}]"
            text += f" {s['roofline_s'] * 1e3:.0f} ms {100 * s['mfu']:.0f}% MFU"
            cells.append(text)
        print(f"{name:42s} {r['wall_s']:6.0f} s  " + " | ".join(cells), flush=True)
    return mismatches


def roofline(step: dict) -> str:
    """'812 ms (compute) | 41%', or '– | –' for a result computed before the HBM-traffic estimate."""
    if "hbm_traffic" not in step:
        return "– | –"
    return f"{step['roofline_s'] * 1e3:.0f} ms ({step['bound']}) | {100 * step['mfu']:.0f}%"


def part_of(name: str) -> str:
    """The part a cached case belongs to (by its name, see `cases`)."""
    if name.endswith("(planned)"):
        return "configs"
    if name.startswith("ppo_lag_llama3_8b "):
        return "rl8b"
    return "llama2" if "_llama2_7b " in name else "tiny"


TITLES = {"configs": "The 8B configs on the slice each names", "llama2": "The Llama-2-7B paper configs",
          "rl8b": "Llama-3.1-8B PPO-Lagrangian (configs/ppo_lag_llama3_8b.py, fsdp over every chip), LoRA r16 actor vs none",
          "tiny": "The tiny configs on v5e-4"}


def markdown(results: dict) -> str:
    """The docs/tpu.md tables of the cached results, one per part: peaks per chip (GiB), fits, the old
    CPU plan and how far off it was ((CPU - TPU) / TPU), the roofline; and the compile times."""
    lines = []
    for part in PARTS:
        cases = {name: r for name, r in results.items() if part_of(name) == part}
        if not cases:
            continue
        lines += ["", f"**{TITLES[part]}**", "",
                  "| case | slice | step | peak GiB/chip | fits | old CPU plan | CPU off by | roofline | MFU |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in cases.items():
            old = old_peaks(name)
            label = name.split(" ")[0] + (f" {name.split(' ')[1]}" if part == "rl8b" else "")
            for s in r.get("steps", []):
                peak = s["peak_bytes"] / GIB
                cpu = old.get(s["name"])
                off = f"{100 * (cpu - peak) / peak:+.0f}%" if cpu else ""
                lines.append(f"| {label} | {r['topology']} | {s['name']} | {'>= ' if s.get('oom') else ''}{peak:.2f} "
                             f"| {'yes' if s['fits'] else '**no**'} | {f'{cpu:.2f}' if cpu else ''} | {off} "
                             f"| {roofline(s)} |")
    times = [(name, r["cpu_s"], r["wall_s"], len(r["steps"])) for name, r in results.items() if r.get("steps")]
    lines += ["", "| case | steps | compile + analysis CPU s | wall s |", "|---|---|---|---|"]
    lines += [f"| {name} | {n} | {cpu:.0f} | {wall:.0f} |" for name, cpu, wall, n in times]
    return "\n".join(lines[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/plan_tables.json")
    parser.add_argument("--parts", default="llama2,rl8b,configs")
    parser.add_argument("--only", default="", help="(re)compute only the case with this name")
    parser.add_argument("--reverse", action="store_true", help="the cases in reverse order (a second worker)")
    parser.add_argument("--merge", nargs="*", default=[], help="other workers' --out files to merge into --out")
    parser.add_argument("--markdown", action="store_true", help="print the cached results as docs/tpu.md tables")
    args = parser.parse_args()
    from jaxalign.plan import chips

    chips.compile_only_host()
    out = pathlib.Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for other in args.merge:
        results.update({k: v for k, v in json.loads(pathlib.Path(other).read_text()).items() if v.get("steps")})
    if args.merge:
        out.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        print(markdown({name: r for name, r in results.items() if r.get("steps")}))
        return 0
    todo = cases(args.parts.split(","))
    for name, config_file, topology, overrides in reversed(todo) if args.reverse else todo:
        if (args.only and name != args.only) or (not args.only and name in results):
            continue
        print(f"{name}: jaxalign plan --config {config_file} --topology {topology} {' '.join(overrides)}",
              file=sys.stderr, flush=True)
        try:
            results[name] = run_case(config_file, topology, overrides)
        except ValueError as error:
            results[name] = {"config": config_file, "topology": topology, "overrides": overrides, "error": str(error),
                             "steps": [], "wall_s": 0.0}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    mismatches = print_tables({name: r for name, r in results.items() if r.get("steps")})
    errors = [name for name, r in results.items() if r.get("error")]
    for name in errors:
        print(f"{name}: error: {results[name]['error']}")
    if mismatches:
        print(f"{mismatches} step(s) of the 8B configs differ from their '# planned:' comment")
    return 1 if mismatches or errors else 0


if __name__ == "__main__":
    sys.exit(main())
