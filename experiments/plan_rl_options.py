"""The TPU compiler's view of three RL options, each step compiled with and without its option
(docs/performance.md, "RL options on the TPU plan").

    python experiments/plan_rl_options.py [--out out/plan_rl_options.json] [--layers 2] [--only NAME] [--markdown]

Every case is `jaxalign plan` (jaxalign/stages/planning.plan_config) of configs/ppo_lag_llama3_8b.py
(Llama-3.1-8B shapes, 128 prompts x (128 + 384) tokens, six roles, PTX) on a TPU slice, one step:

  logits_chunk   the update, rl.logits_chunk 0 (the [B, L, 128256] fp32 logits) vs 128 (the LM head
                 and log-softmax 128 positions at a time, each chunk rematerialised)
  old_log_probs  the scoring step, rl.old_log_probs "recompute" (actor + reference + 4 score passes)
                 vs "sampler" (the actor's forward skipped)
  rollout        the rollout (the sampler's prefill + 384 decode steps) with the code as it is: the
                 stacked KV cache carried through the layer scan, each token's column written in place

--layers N keeps N of the model's 32 decoder layers (default 2): a full 8B step takes the TPU compiler
25-45 minutes on the 2-core project machine, a 2-layer one a few. The LM head, the vocabulary and the
batch are the 8B config's, so what an option changes in the logits' memory is the same; the layers'
share of flops and memory is 2/32 of the full model's. Results are cached in --out by case name.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 1024**3
CONFIG = "configs/ppo_lag_llama3_8b.py"
# (name, topology, step, overrides): each option's off / on pair on the slices the 8B plans use
CASES = [
    *[(f"update v5p-8 logits_chunk={chunk}", "v5p-8", "update", [f"--config.rl.logits_chunk={chunk}"])
      for chunk in (0, 128)],
    *[(f"scoring v5p-8 old_log_probs={mode}", "v5p-8", "scoring", [f"--config.rl.old_log_probs={mode}"])
      for mode in ("recompute", "sampler")],
    ("scoring v5p-8 old_log_probs=sampler logits_chunk=128", "v5p-8", "scoring",
     ["--config.rl.old_log_probs=sampler", "--config.rl.logits_chunk=128"]),
    *[(f"update v5e-16 logits_chunk={chunk}", "v5e-16", "update", [f"--config.rl.logits_chunk={chunk}"])
      for chunk in (0, 128)],
    ("rollout v5p-8", "v5p-8", "rollout", []),
]


def run_case(topology_name: str, step: str, overrides: list[str], layers: int) -> dict:
    from jaxalign import config as config_lib
    from jaxalign.plan import chips
    from jaxalign.stages import planning

    topology = chips.topology(topology_name)
    overrides = [*overrides, "--config.mesh.fsdp=-1", f"--config.model.hf_config.num_hidden_layers={layers}"]
    config = config_lib.load_config(REPO / CONFIG, overrides)
    start, cpu = time.perf_counter(), time.process_time()
    _, _, plans = planning.plan_config(config, topology, only=(step,), progress=False)
    return {"topology": topology_name, "overrides": overrides, "wall_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu, "steps": [p.to_json() for p in plans]}


def markdown(results: dict) -> str:
    """One row per case: memory per chip (GiB), flops and HBM traffic per chip, roofline."""
    lines = ["| case | arguments | temporaries | peak | TFLOP | HBM traffic GB | roofline ms |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for s in r["steps"]:
            lines.append(f"| {name} | {s['argument_bytes'] / GIB:.2f} | {s['temp_bytes'] / GIB:.2f} "
                         f"| {s['peak_bytes'] / GIB:.2f} | {s['flops'] / 1e12:.2f} | {s['hbm_traffic'] / 1e9:.1f} "
                         f"| {s['roofline_s'] * 1e3:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/plan_rl_options.json")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--only", default="", help="(re)compute only the cases whose name contains this")
    parser.add_argument("--markdown", action="store_true", help="print the cached results as a table")
    args = parser.parse_args()
    from jaxalign.plan import chips

    chips.compile_only_host()
    out = pathlib.Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.markdown:
        print(markdown(results))
        return 0
    for name, topology, step, overrides in CASES:
        if (args.only and args.only not in name) or (not args.only and name in results):
            continue
        print(f"{name}: plan {CONFIG} on {topology} {' '.join(overrides)}", file=sys.stderr, flush=True)
        results[name] = run_case(topology, step, overrides, args.layers)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        s = results[name]["steps"][0]
        print(f"{name:44s} temp {s['temp_bytes'] / GIB:6.2f} peak {s['peak_bytes'] / GIB:6.2f} GiB "
              f"{s['flops'] / 1e12:8.2f} TFLOP {results[name]['wall_s']:5.0f} s", flush=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
