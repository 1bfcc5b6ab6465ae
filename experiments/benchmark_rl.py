"""PPO-Lagrangian benchmark: the iteration time and its split on CPU.

    python experiments/benchmark_rl.py [--out out/benchmark_rl.json] [--iterations 5]

1. cpu: PPO-Lagrangian iterations on one CPU device at two sizes, every role a random model of
   one architecture, PTX on:
     quickstart  configs/ppo_lag_tiny.py shapes: the sft_tiny Llama (hidden 64, 2 layers, vocab
                 1024); 16 prompts of 48 tokens + 32 new tokens
     benchmark   experiments/benchmark_llama.py's model (hidden 512, 8 layers, vocab 8192), scaled
                 for 2 cores: 8 prompts of 32 tokens + 32 new tokens
   Each size runs two programs from the same state on the same batches, iterations interleaved
   (separate, stacked, separate, ...) so that load from other processes hits both alike:
   `separate` runs every role's pass alone (compile_program(stack_roles=False)), `stacked` runs
   roles of one architecture as one batched pass (rl/stacking.py). Reports the first iteration
   (compiles included), the median generate / score / train seconds of the next ones, and the
   ratio separate / stacked (wall and process CPU seconds per iteration).
The memory and roofline of the paper-scale iterations on TPU slices: experiments/plan_tables.py
(`jaxalign plan`, the TPU compiler).

Each size runs in a subprocess with its own XLA_FLAGS (1 host device).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import tqdm

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import benchmark_common  # noqa: E402  (experiments/ is the script's own dir)

TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
PAD, EOS = 0, 2


def _mesh(fsdp: int):
    import jax

    from configs import base
    from jaxalign.parallel import mesh as mesh_lib

    mesh_config = base.get_config().mesh
    mesh_config.data, mesh_config.fsdp, mesh_config.tensor = 1, fsdp, 1
    return mesh_lib.make_mesh(mesh_config, devices=jax.devices()[:fsdp]), mesh_lib.axis_rules(mesh_config)


def rl_settings(**changes):
    """configs/base.py's config.rl with `changes`."""
    import dataclasses

    from configs import base
    from jaxalign.rl.settings import RLSettings

    return dataclasses.replace(RLSettings.from_group(base.get_config().rl), **changes)


def build(model_kwargs: dict, algorithm, settings, mesh, rules, stack_roles: bool = False):
    """jaxalign.plan.rl's program over abstract roles of one architecture (as with an SFT actor and
    RM/CM trained from it) -> (program, abstract params by role, param shardings by role, optimizers)."""
    import jax

    from jaxalign.models import llama, score
    from jaxalign.plan import rl as rl_plan
    from jaxalign.rl import steps
    from jaxalign.train import optim

    cfg = llama.LlamaConfig(**model_kwargs, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    scorers = {role: rl_plan.ScoreRole(score.ScoreModel(cfg)) for role in algorithm.roles
               if role not in ("actor", "reference")}
    actor = optim.OptimizerSettings(learning_rate=1e-5, lr_schedule="cosine", warmup_ratio=0.03, weight_decay=0.01)
    critic = optim.OptimizerSettings(learning_rate=5e-6, lr_schedule="constant", where="config.rl.critic")
    optimizers = steps.Optimizers(optim.make_optimizer(actor, 1000), optim.make_optimizer(critic, 1000),
                                  optim.make_schedule(actor, 1000), optim.make_schedule(critic, 1000))
    plan = rl_plan.RLPlan(algorithm, settings, optimizers, cfg, scorers, batch_size=1)
    built = rl_plan.build_program(plan, mesh, rules, stack_roles=stack_roles)
    shardings = {role: jax.tree.map(lambda x: x.sharding, tree) for role, tree in built.params.items()}
    return built.program, built.params, shardings, optimizers


# ------------------------------------------------------------------------------------------- CPU


SIZES = {  # name: (model, prompts, prompt tokens, new tokens)
    "quickstart": (TINY, 16, 48, 32),
    "benchmark": (dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024), 8, 32, 32),
}
VARIANTS = {"separate": False, "stacked": True}  # name: compile_program(stack_roles=...)
PARTS = ("generate", "score", "train")


def cpu_iterations(size: str, iterations: int) -> dict:
    import jax
    import numpy as np

    from jaxalign.parallel import mesh as mesh_lib
    from jaxalign.rl import algorithms, iteration, steps
    from jaxalign.rl.algorithms.ppo_lag import PPOLagSettings

    model, batch, prompt, new = SIZES[size]
    algorithm = algorithms.make("ppo_lag", has_cost_model=True, settings=PPOLagSettings(episode_cost_window_size=32))
    settings = rl_settings(prompt_length=prompt, max_new_tokens=new, ptx_coeff=1.0)
    mesh, rules = _mesh(1)
    programs = {}
    for name, stack_roles in VARIANTS.items():
        programs[name], params_abs, shardings, optimizers = build(model, algorithm, settings, mesh, rules,
                                                                  stack_roles=stack_roles)
    rng = np.random.default_rng(0)

    def random_params(role, seed):
        leaves, tree = jax.tree.flatten(params_abs[role])
        keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
        return jax.tree.unflatten(tree, [0.02 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])

    frozen, states = {}, {}
    for name, program in programs.items():  # each program its own buffers: the train step donates its state
        params = {role: random_params(role, i) for i, role in enumerate(shardings)}
        trained = {role: params.pop(role) for role in steps.trained_roles(algorithm)}
        frozen[name] = jax.device_put(params, program.frozen_shardings)
        states[name] = jax.device_put(steps.init_rl_state(algorithm, settings, trained, optimizers,
                                                          jax.random.PRNGKey(0)), program.state_shardings)

    class Batches:
        def __init__(self, length, sft=False):
            self.length, self.sft = length, sft

        def __next__(self):
            ids = rng.integers(3, model["vocab_size"], size=(batch, self.length), dtype=np.int32)
            mask = np.arange(self.length)[None, :] >= rng.integers(0, self.length // 2, size=(batch, 1))
            out = {"input_ids": np.where(mask, ids, PAD), "attention_mask": mask}
            if self.sft:
                out["loss_mask"] = mask & (np.arange(self.length)[None, :] >= self.length // 2)
            return out

    batches = iteration.RLBatches(Batches(prompt), Batches(prompt + new, sft=True), 1)
    records = {name: [] for name in programs}
    with mesh_lib.sharding_context(mesh, rules):
        for _ in tqdm.trange(iterations + 1, desc=f"RL iterations ({size}, 2 programs)", unit="it", file=sys.stderr):
            data = next(batches)
            for name, program in programs.items():
                cpu = time.process_time()
                states[name], metrics = iteration.rl_iteration(program, algorithm, settings, frozen[name],
                                                               states[name], data)
                metrics["cpu_s"] = time.process_time() - cpu
                records[name].append(metrics)
    out = {"size": size, "model": model, "batch": batch, "prompt_length": prompt, "max_new_tokens": new,
           "iterations": iterations, "cpu_count": os.cpu_count()}
    for name, (first, *rest) in records.items():
        median = lambda key: float(np.median([m[key] for m in rest]))  # noqa: E731
        split = {part: median(f"time/{part}_s") for part in PARTS}
        total = median("time/iteration_s")
        out[name] = {
            "first_iteration_s": first["time/iteration_s"],
            "first_split_s": {part: first[f"time/{part}_s"] for part in PARTS},
            "iteration_s_median": total, "cpu_s_median": median("cpu_s"), "split_s_median": split,
            "split_fraction": {part: value / total for part, value in split.items()},
            "tokens_per_s": median("tokens_per_s"), "generate_tokens_per_s": median("generate_tokens_per_s"),
            "mean_generated_length": median("mean_generated_length"),
        }
    sep, stk = out["separate"], out["stacked"]
    out["speedup"] = {"iteration": sep["iteration_s_median"] / stk["iteration_s_median"],
                      "iteration_cpu": sep["cpu_s_median"] / stk["cpu_s_median"],
                      **{part: sep["split_s_median"][part] / stk["split_s_median"][part] for part in PARTS}}
    return out


# ------------------------------------------------------------------------------------------ main


def _print_cpu(c: dict) -> None:
    print(f"\nPPO-Lagrangian iteration on CPU ({c['cpu_count']} cores), {c['size']} size: {c['batch']} prompts x "
          f"({c['prompt_length']} + {c['max_new_tokens']}) tokens, hidden {c['model']['hidden_size']}, "
          f"{c['model']['num_hidden_layers']} layers, vocab {c['model']['vocab_size']}, 6 roles, PTX on")
    # Work per step in forward passes over the [B, S+N] batch (fwd+bwd ~ 3 forwards).
    work = {"generate": "prefill + N one-token decode steps",
            "score": "6 forwards: actor, reference, reward, cost, 2 critics",
            "train": "4 fwd+bwd (actor RL, actor PTX, 2 critics) + 3 AdamW updates"}
    for name in VARIANTS:
        v = c[name]
        split, fraction = v["split_s_median"], v["split_fraction"]
        print(f"  {name}: first iteration (compiles) {v['first_iteration_s']:.1f} s; steady state "
              f"{v['iteration_s_median']:.3f} s/iteration (median of {c['iterations']}; {v['cpu_s_median']:.3f} "
              f"CPU s), {v['tokens_per_s']:.0f} tokens/s")
        for part in PARTS:
            print(f"    {part:9s} {split[part]:7.3f} s  {100 * fraction[part]:5.1f}%   {work[part]}")
    speedup = c["speedup"]
    print(f"  separate / stacked: iteration {speedup['iteration']:.2f}x (CPU seconds {speedup['iteration_cpu']:.2f}x); "
          + ", ".join(f"{part} {speedup[part]:.2f}x" for part in PARTS))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/benchmark_rl.json")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations after the first")
    parser.add_argument("--part", choices=["cpu"], help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="quickstart,benchmark", help="comma list of the cpu part's sizes")
    parser.add_argument("--benchmark-iterations", type=int, default=3, help="timed iterations at benchmark size")
    args = parser.parse_args()
    if args.part == "cpu":
        print("RESULT " + json.dumps(cpu_iterations(args.size, args.iterations)), flush=True)
        return 0

    out = pathlib.Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if "iteration_s_median" in result.get("cpu", {}):  # an older file: one size, no separate/stacked split
        del result["cpu"]
    result.pop("memory", None)  # the CPU-mesh memory plans before experiments/plan_tables.py
    for size in args.sizes.split(","):
        iterations = args.iterations if size == "quickstart" else args.benchmark_iterations
        result.setdefault("cpu", {})[size] = benchmark_common.run_child(
            __file__, "cpu", 1, ["--size", size, "--iterations", str(iterations)])[0]
    for c in result.get("cpu", {}).values():
        _print_cpu(c)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
