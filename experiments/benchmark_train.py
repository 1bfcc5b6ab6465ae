"""Training benchmarks: SFT step throughput on CPU, and LoRA against full SFT.

    python experiments/benchmark_train.py [--out out/benchmark_train.json] [--steps 5] [--parts throughput,lora_sft]

1. throughput: one SFT train step (fwd + bwd + AdamW, jitted, state donated) of a Llama with
   vocab 8192, hidden 512, intermediate 1408, 8 layers, 8 heads / 4 KV heads, seq 512, batch 4,
   fp32, on one CPU device. Reports tokens/s and MFU against a measured fp32 matmul peak of the
   same device (model FLOPs = 6 N + 12 L T d_attn per token, N = non-embedding parameters;
   XLA's cost analysis is recorded too but counts the scanned layer body once).
2. lora_sft: the SFT step of the sft_tiny model (hidden 96, 3 layers) with LoRA (rank 8 on every
   projection, base frozen) against the full step, same batches, interleaved; the ratio of median
   step times and the trained-state bytes (params + AdamW moments) of both, at tiny and Llama-3.1-8B
   size (abstract shapes).

The per-chip memory and roofline of the 7B / 8B steps on TPU slices (formerly parts memory and
lora_rl here, on a simulated CPU mesh): experiments/plan_tables.py (`jaxalign plan`, the TPU compiler).

Each part runs in a subprocess with its own XLA_FLAGS (1 host device).
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

BENCH_MODEL = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
)


def _train_config(learning_rate=2e-5):
    from jaxalign.train import optim

    return optim.OptimizerSettings(learning_rate=learning_rate, lr_schedule="cosine", warmup_ratio=0.03)


def _mesh(fsdp: int, tensor: int = 1, num_devices: int | None = None):
    import jax

    from configs import base
    from jaxalign.parallel import mesh as mesh_lib

    mesh_config = base.get_config().mesh
    mesh_config.data, mesh_config.fsdp, mesh_config.tensor = 1, fsdp, tensor
    devices = jax.devices()[: num_devices or fsdp * tensor]
    return mesh_lib.make_mesh(mesh_config, devices=devices), mesh_lib.axis_rules(mesh_config)


def _param_count(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------- throughput


def matmul_peak_flops(n: int = 1024, repeats: int = 20) -> float:
    """Best fp32 FLOP/s of a jitted n x n matmul on the default device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def throughput(steps: int, batch_size: int = 4, seq_len: int = 512) -> dict:
    import jax
    import numpy as np

    from jaxalign.models import llama, loading
    from jaxalign.objectives import sft
    from jaxalign.parallel import mesh as mesh_lib
    from jaxalign.train import loop, optim, state as state_lib

    cfg = llama.LlamaConfig(**BENCH_MODEL)
    model = llama.Llama(cfg)
    mesh, rules = _mesh(1)
    tx = optim.make_optimizer(_train_config(), 1000)
    init_params = loading.init_fn(model)
    abstract = state_lib.abstract_train_state(init_params, tx, mesh, rules)
    params, _ = mesh_lib.init_sharded(init_params, jax.random.PRNGKey(0), mesh, rules)
    state = state_lib.init_train_state(params, tx, jax.random.PRNGKey(1), abstract)

    rng = np.random.default_rng(0)
    sharding = mesh_lib.batch_sharding(mesh)
    batch = {
        "input_ids": jax.device_put(rng.integers(4, cfg.vocab_size, (batch_size, seq_len), dtype=np.int32), sharding),
        "attention_mask": jax.device_put(np.ones((batch_size, seq_len), bool), sharding),
        "loss_mask": jax.device_put(np.arange(seq_len)[None].repeat(batch_size, 0) >= 64, sharding),
    }
    shardings = state_lib.shardings_of(abstract)
    step = jax.jit(
        loop.make_train_step(sft.make_loss_fn(model), tx, 1),
        in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0,
    )
    with mesh_lib.sharding_context(mesh, rules):
        start = time.perf_counter()
        compiled = step.lower(state, [batch]).compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        state, metrics = step(state, [batch])  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in tqdm.trange(steps, desc="train steps", unit="step", file=sys.stderr):
            start = time.perf_counter()
            state, metrics = step(state, [batch])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)

    all_params = _param_count(state.params)
    embed = cfg.vocab_size * cfg.hidden_size
    n_matmul = all_params - embed  # the input embedding is a gather; lm_head is a matmul
    d_attn = cfg.num_attention_heads * cfg.head_dim
    flops_per_token = 6 * n_matmul + 12 * cfg.num_hidden_layers * seq_len * d_attn
    tokens = batch_size * seq_len
    step_s = float(np.median(times))
    peak = matmul_peak_flops()
    achieved = flops_per_token * tokens / step_s
    return {
        "model": BENCH_MODEL,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "params": all_params,
        "compile_s": compile_s,
        "step_s_median": step_s,
        "step_s_all": times,
        "tokens_per_s": tokens / step_s,
        "model_flops_per_step": flops_per_token * tokens,
        "xla_flops_per_step": float(cost.get("flops", float("nan"))) if cost else None,
        "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peak,
        "mfu": achieved / peak,
        "loss": float(metrics["loss"]),
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
    }


# -------------------------------------------------------------------------------------------- LoRA


def llama31_8b() -> dict:
    """Llama-3.1-8B's config.json fields (rope llama3)."""
    from jaxalign.models.layers import RopeScaling

    return dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))


SFT_TINY = dict(vocab_size=1024, hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)


def _state_bytes(abstract) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((abstract.params, abstract.opt_state))))


def lora_sft(steps: int, rank: int = 8, batch_size: int = 16, seq_len: int = 64) -> dict:
    """SFT step time with LoRA vs full at the sft_tiny size, and trained-state bytes (tiny and 8B)."""
    import jax
    import numpy as np

    from jaxalign.models import llama, loading, lora
    from jaxalign.objectives import sft
    from jaxalign.parallel import mesh as mesh_lib
    from jaxalign.train import loop, optim, state as state_lib

    settings = lora.LoraSettings(rank=rank, alpha=2.0 * rank)
    mesh, rules = _mesh(1)
    tx = optim.make_optimizer(_train_config(1e-3), 1000)
    cfg = llama.LlamaConfig(**SFT_TINY)
    model = llama.Llama(cfg)
    base, _ = mesh_lib.init_sharded(loading.init_fn(model), jax.random.PRNGKey(0), mesh, rules)
    abstract = {"full": state_lib.abstract_train_state(loading.init_fn(model), tx, mesh, rules),
                "lora": state_lib.abstract_train_state(lora.adapter_init_fn(model, settings), tx, mesh, rules)}
    adapters, _ = lora.init_adapters(model, settings, jax.random.PRNGKey(1), mesh, rules)
    loss = {"full": sft.make_loss_fn(model), "lora": lora.on_base(sft.make_loss_fn(lora.wrap(model, settings)))}
    rng = np.random.default_rng(0)
    sharding = mesh_lib.batch_sharding(mesh)
    batch = {"input_ids": jax.device_put(rng.integers(4, cfg.vocab_size, (batch_size, seq_len), dtype=np.int32), sharding),
             "attention_mask": jax.device_put(np.ones((batch_size, seq_len), bool), sharding),
             "loss_mask": jax.device_put(np.arange(seq_len)[None].repeat(batch_size, 0) >= 24, sharding)}
    states, step_fns, times = {}, {}, {"full": [], "lora": []}
    with mesh_lib.sharding_context(mesh, rules):
        for name in ("full", "lora"):
            shardings = state_lib.shardings_of(abstract[name])
            params = jax.tree.map(jax.numpy.copy, base) if name == "full" else adapters
            states[name] = state_lib.init_train_state(params, tx, jax.random.PRNGKey(2), abstract[name])
            frozen = None if name == "full" else base
            step = jax.jit(loop.make_train_step(loss[name], tx, 1), in_shardings=(shardings, None, None),
                           out_shardings=(shardings, None), donate_argnums=0)
            step_fns[name] = lambda state, step=step, frozen=frozen: step(state, [batch], frozen)
            states[name], metrics = step_fns[name](states[name])  # compile + warm-up
            jax.block_until_ready(metrics)
        for _ in tqdm.trange(steps, desc="SFT steps (full, lora)", file=sys.stderr):
            for name in ("full", "lora"):  # interleaved: load from other processes hits both alike
                start = time.perf_counter()
                states[name], metrics = step_fns[name](states[name])
                jax.block_until_ready(metrics)
                times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    mesh128, rules128 = _mesh(1)
    cfg8 = llama.LlamaConfig(**llama31_8b(), dtype="bfloat16", param_dtype="float32")
    model8 = llama.Llama(cfg8)
    state8 = {"full": state_lib.abstract_train_state(loading.init_fn(model8), tx, mesh128, rules128),
              "lora": state_lib.abstract_train_state(lora.adapter_init_fn(model8, settings), tx, mesh128, rules128)}
    return {
        "rank": rank, "model": SFT_TINY, "batch_size": batch_size, "seq_len": seq_len,
        "step_s_median": median, "step_s_all": times, "lora_over_full": median["lora"] / median["full"],
        "trained_state_bytes": {name: _state_bytes(a) for name, a in abstract.items()},
        "trained_state_bytes_8b": {name: _state_bytes(a) for name, a in state8.items()},
        "base_param_bytes_8b": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state8["full"].params))),
        "cpu_count": os.cpu_count(),
    }


# -------------------------------------------------------------------------------------------- main


def _child(part: str, args) -> None:
    if part == "throughput":
        print("RESULT " + json.dumps(throughput(args.steps)), flush=True)
    elif part == "lora_sft":
        print("RESULT " + json.dumps(lora_sft(args.steps)), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/benchmark_train.json")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up step")
    parser.add_argument("--part", choices=["throughput", "lora_sft"], help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="throughput,lora_sft", help="comma list; others keep their value in --out")
    args = parser.parse_args()
    if args.part:
        _child(args.part, args)
        return 0

    out = pathlib.Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    parts = args.parts.split(",")
    if "throughput" in parts:
        result["throughput"] = benchmark_common.run_child(__file__, "throughput", 1, ["--steps", str(args.steps)])[0]
    if "lora_sft" in parts:
        result["lora_sft"] = benchmark_common.run_child(__file__, "lora_sft", 1, ["--steps", str(args.steps)])[0]
    if "throughput" in result:
        _print_throughput(result["throughput"])
    if "lora_sft" in result:
        _print_lora_sft(result["lora_sft"])
    for old in ("memory", "lora_rl"):  # CPU-mesh memory plans before experiments/plan_tables.py
        result.pop(old, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def _print_throughput(t: dict) -> None:
    print(f"SFT step on CPU ({t['device']}, {t['cpu_count']} cores): batch {t['batch_size']} x {t['seq_len']}, "
          f"{t['params'] / 1e6:.1f}M params")
    print(f"  step {t['step_s_median']:.3f} s (median of {len(t['step_s_all'])}), {t['tokens_per_s']:.0f} tokens/s, "
          f"model {t['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s vs matmul peak {t['matmul_peak_flops_per_s'] / 1e9:.1f} "
          f"GFLOP/s -> MFU {100 * t['mfu']:.1f}%  (compile {t['compile_s']:.1f} s)")


def _print_lora_sft(r: dict) -> None:
    gib, med = benchmark_common.GIB, r["step_s_median"]
    print(f"\nSFT step, sft_tiny size ({r['batch_size']} x {r['seq_len']}), LoRA rank {r['rank']} vs full: "
          f"{med['lora'] * 1e3:.1f} ms vs {med['full'] * 1e3:.1f} ms -> ratio {r['lora_over_full']:.2f}")
    tiny, big = r["trained_state_bytes"], r["trained_state_bytes_8b"]
    print(f"  trained state (params + AdamW): tiny {tiny['lora'] / 1e6:.2f} MB vs {tiny['full'] / 1e6:.2f} MB; "
          f"Llama-3.1-8B {big['lora'] / gib:.2f} GiB vs {big['full'] / gib:.1f} GiB "
          f"(frozen fp32 base {r['base_param_bytes_8b'] / gib:.1f} GiB)")


if __name__ == "__main__":
    sys.exit(main())
