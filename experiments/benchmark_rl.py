"""PPO-Lagrangian benchmarks: the iteration time and its split on CPU, and the 7B memory plan.

    python experiments/benchmark_rl.py [--out out/benchmark_rl.json] [--iterations 5] [--parts cpu,memory]

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
2. memory: per-device memory of the three compiled steps of a Llama-2-7B PPO-Lagrangian
   iteration (actor sampler; scoring by actor, reference, reward, cost and both critics; actor
   + PTX update and both critic updates with AdamW), AOT-compiled on a simulated 64-device CPU
   mesh (fsdp=64) from abstract inputs with shardings: `jit(...).lower(...).compile()
   .memory_analysis()`. Nothing is allocated. The CPU compiler's plan approximates a TPU's.
   The scoring and update steps once more with roles stacked (rows '... stacked').

Each part runs in a subprocess with its own XLA_FLAGS (1 and 64 host devices).
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
LLAMA2_7B = dict(vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
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


def build(model_kwargs: dict, algorithm, settings, mesh, rules, stack_roles: bool = False, **cfg_runtime):
    """(program, abstract params by role, param shardings by role, optimizers, abstract state) for one
    model size: every role is the same architecture (as with an SFT actor and RM/CM trained from it)."""
    import dataclasses

    import jax

    from jaxalign.models import llama, loading, lora, score
    from jaxalign.parallel import mesh as mesh_lib
    from jaxalign.rl import roles, steps
    from jaxalign.train import optim

    lora_settings = cfg_runtime.pop("lora", None)  # a lora.LoraSettings: the actor is adapters on the reference
    lora_critics = cfg_runtime.pop("lora_critics", False)  # config.lora.critics: adapters + head on the scorer
    frozen_dtype = cfg_runtime.pop("frozen_param_dtype", "")  # config.rl.frozen_param_dtype
    lora_on = lora_settings is not None and lora_settings.enabled
    cfg = llama.LlamaConfig(**model_kwargs, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, **cfg_runtime)
    frozen_cfg = dataclasses.replace(cfg, param_dtype=frozen_dtype) if frozen_dtype else cfg
    policy, scorer = llama.Llama(cfg), score.ScoreModel(cfg)
    score_fn = roles.score_role_fn(scorer)
    critic_fn = roles.ScoreModelFn(scorer, adapted=lora.wrap(scorer, lora_settings)) if lora_critics else score_fn
    scored = [role for role in algorithm.roles if role not in ("actor", "reference")]
    bases = {"actor": "reference"} if lora_on else {}
    if lora_critics:
        bases.update({role: role[: -len("_critic")] for role in scored if role.endswith("_critic")})
    fns = roles.RoleFns(policy=roles.policy_fn(cfg, lora_settings),
                        generate=roles.sampler_fn(cfg, settings, PAD, lora_settings=lora_settings),
                        scores={role: critic_fn if role in bases else score_fn for role in scored}, bases=bases)
    kind = {role: "policy" if role in ("actor", "reference") else "score" for role in algorithm.roles}
    module = {"policy": policy, "score": scorer}
    abstract = {name: loading.abstract_params(m, mesh, rules) for name, m in module.items()}
    frozen_abstract = {name: loading.abstract_params(m.clone(cfg=frozen_cfg), mesh, rules)
                       for name, m in module.items()}
    trained_roles = steps.trained_roles(algorithm)
    params_abs = {role: (abstract if role in trained_roles else frozen_abstract)[k] for role, k in kind.items()}
    if lora_on:
        params_abs["actor"] = lora.abstract_adapters(policy, lora_settings, mesh, rules)
    for role, base in bases.items():
        if role != "actor":  # a LoRA critic: adapters + its own (trained-dtype) score head
            params_abs[role] = {**lora.abstract_adapters(scorer, lora_settings, mesh, rules),
                                "score_head": abstract["score"]["score_head"]}
    shardings = {role: jax.tree.map(lambda x: x.sharding, params_abs[role]) for role in kind}
    actor = optim.OptimizerSettings(learning_rate=1e-5, lr_schedule="cosine", warmup_ratio=0.03, weight_decay=0.01)
    critic = optim.OptimizerSettings(learning_rate=5e-6, lr_schedule="constant", where="config.rl.critic")
    optimizers = steps.Optimizers(optim.make_optimizer(actor, 1000), optim.make_optimizer(critic, 1000),
                                  optim.make_schedule(actor, 1000), optim.make_schedule(critic, 1000))
    trained = {name: params_abs[name] for name in trained_roles}
    abstract_state = jax.eval_shape(
        lambda p: steps.init_rl_state(algorithm, settings, p, optimizers, jax.random.PRNGKey(0)), trained)
    ptx_sh = {key: mesh_lib.batch_sharding(mesh, 2) for key in ("input_ids", "attention_mask", "loss_mask")}
    frozen_sh = {name: shardings[name] for name in shardings if name not in trained}
    program = steps.compile_program(fns, algorithm, settings, optimizers, mesh, abstract_state, shardings, frozen_sh,
                                    ptx_sh, stack_roles=stack_roles)
    return program, params_abs, shardings, optimizers, abstract_state


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
        programs[name], params_abs, shardings, optimizers, _ = build(model, algorithm, settings, mesh, rules,
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


# ---------------------------------------------------------------------------------------- memory


def memory_plan(fsdp: int = 64, batch: int = 128, prompt: int = 128, new: int = 384, remat: str = "full",
                model: dict | None = None, lora=None, label: str = "Llama-2-7B", stack_roles: bool = False,
                rl: dict | None = None, only: tuple[str, ...] = (), lora_critics: bool = False,
                frozen_param_dtype: str = "") -> list[dict]:
    """Per-device memory of the three compiled steps (see the module docstring) of `model` (default
    Llama-2-7B); lora: a lora.LoraSettings for a LoRA actor (adapters on the reference); stack_roles:
    the scoring and update steps with roles stacked (rl/stacking.py; the rollout is the same);
    lora_critics: config.lora.critics (adapters + head on the reward / cost model); frozen_param_dtype:
    config.rl.frozen_param_dtype (the reference, reward and cost models' storage dtype);
    rl: config.rl changes (num_minibatches k: the update step sees batch / k rows, as the stage runs it);
    only: the steps whose name starts with one of these ("" = all)."""
    import jax
    import jax.numpy as jnp

    from jaxalign.parallel import mesh as mesh_lib
    from jaxalign.rl import algorithms, steps as rl_steps

    algorithm = algorithms.make("ppo_lag", has_cost_model=True)
    settings = rl_settings(**{"prompt_length": prompt, "max_new_tokens": new, **(rl or {})})
    mesh, rules = _mesh(fsdp)
    program, params_abs, shardings, _, abstract_state = build(
        model or LLAMA2_7B, algorithm, settings, mesh, rules, dtype="bfloat16", param_dtype="float32", remat_policy=remat,
        lora=lora, stack_roles=stack_roles, lora_critics=lora_critics, frozen_param_dtype=frozen_param_dtype,
        scan_layers=True)
    length, response = prompt + new, new
    rep = mesh_lib.replicated(mesh)

    def array(shape, dtype, sharding=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding or mesh_lib.batch_sharding(mesh, len(shape)))

    params = {role: mesh_lib.with_shardings(params_abs[role], shardings[role]) for role in shardings}
    frozen = {name: params[name] for name in params if name not in rl_steps.trained_roles(algorithm)}
    state = mesh_lib.with_shardings(abstract_state, program.state_shardings)
    rows = batch // settings.num_minibatches  # the update step's micro-batch (stages/rl.py: PTX batches too)
    exp = rl_steps.abstract_experience(algorithm, rows, length, response, mesh_lib.batch_sharding(mesh, 2))
    ptx = {"input_ids": array((rows, length), jnp.int32), "attention_mask": array((rows, length), jnp.bool_),
           "loss_mask": array((rows, length), jnp.bool_)}
    steps = {
        "rollout (actor sampler)": (program.rollout, (program.actor_params(params["actor"], frozen), array((batch, prompt), jnp.int32),
                                                       array((batch, prompt), jnp.bool_),
                                                       jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))),
        "scoring (6 roles, GAE)": (program.score_jit, (frozen, state, array((batch, length), jnp.int32),
                                                       array((batch, length), jnp.bool_),
                                                       array((batch, response), jnp.float32))),
        "update (actor+PTX, 2 critics)": (program.train_jit, (state, exp, jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
                                                          ptx, frozen)),
    }
    if stack_roles:
        steps = {f"{name} stacked": step for name, step in steps.items() if not name.startswith("rollout")}
    if only:
        steps = {name: step for name, step in steps.items() if name.startswith(tuple(only))}
    results = []
    for name, (fn, args) in steps.items():
        start = time.perf_counter()
        with mesh_lib.sharding_context(mesh, rules):
            compiled = fn.lower(*args).compile()
        memory = benchmark_common.memory_of(compiled)
        results.append({
            "model": label, "lora_rank": int(lora.rank) if lora is not None else 0, "lora_critics": lora_critics,
            "frozen_param_dtype": frozen_param_dtype or "float32",
            "trained_state_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)),
            "step": name, "devices": fsdp, "global_batch": batch, "prompt_length": prompt, "max_new_tokens": new,
            "remat": remat, "num_minibatches": settings.num_minibatches, "ptx_coeff": settings.ptx_coeff,
            "compile_s": time.perf_counter() - start, **memory,
            "fits": benchmark_common.fits(memory["peak_bytes"]),
        })
        print("RESULT " + json.dumps(results[-1]), flush=True)
    return results


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


def _print_memory(memory: list[dict]) -> None:
    benchmark_common.print_memory_table(
        "Per-device memory of a Llama-2-7B PPO-Lagrangian iteration (AOT, simulated CPU mesh; fp32 params, "
          "AdamW for actor + 2 critics, bf16 compute, remat full)",
        memory, "step", 40)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/benchmark_rl.json")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations after the first")
    parser.add_argument("--part", choices=["cpu", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="quickstart,benchmark", help="comma list of the cpu part's sizes")
    parser.add_argument("--benchmark-iterations", type=int, default=3, help="timed iterations at benchmark size")
    parser.add_argument("--parts", default="cpu,memory", help="comma list; others keep their value in --out")
    args = parser.parse_args()
    if args.part == "cpu":
        print("RESULT " + json.dumps(cpu_iterations(args.size, args.iterations)), flush=True)
        return 0
    if args.part == "memory":
        memory_plan()
        memory_plan(stack_roles=True)
        return 0

    out = pathlib.Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if "iteration_s_median" in result.get("cpu", {}):  # an older file: one size, no separate/stacked split
        del result["cpu"]
    parts = args.parts.split(",")
    if "cpu" in parts:
        for size in args.sizes.split(","):
            iterations = args.iterations if size == "quickstart" else args.benchmark_iterations
            result.setdefault("cpu", {})[size] = benchmark_common.run_child(
                __file__, "cpu", 1, ["--size", size, "--iterations", str(iterations)])[0]
    if "memory" in parts:
        result["memory"] = benchmark_common.run_child(__file__, "memory", 64, ["--iterations", str(args.iterations)])
    for c in result.get("cpu", {}).values():
        _print_cpu(c)
    if "memory" in result:
        _print_memory(result["memory"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
