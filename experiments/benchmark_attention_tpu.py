"""Compile-only: memory and flops of a Llama SFT train step on TPU v5e with the XLA attention and with
Pallas splash attention (config.model.attention_impl "xla" vs "pallas"); nothing runs.

    python experiments/benchmark_attention_tpu.py [--out out/benchmark_attention_tpu.json]

The step is the SFT stage's (train.loop.make_train_step over objectives.sft's loss: forward, backward,
AdamW; state donated), from abstract inputs on libtpu's compile-only v5e:2x2 slice (4 chips, mesh
fsdp 4), bf16 compute and fp32 parameters, batch 4 (one row per chip), Llama-3.2-1B shapes (hidden
2048, 16 layers, 32 heads / 8 KV heads, head_dim 64, MLP 8192, vocab 128256), at seq 2048 and 4096,
with remat "none" and "full". Per case: the TPU compiler's memory_analysis (argument / output / temp
bytes per chip) and cost_analysis (flops, bytes accessed per chip). XLA's cost analysis counts a
Pallas kernel's flops as 0 (a custom call), so the kernel's attention flops are added from the
kernel's own count (4 B H T^2 Dh / 2 forward, causal, times 3.5 with the backward: QK^T, PV, and
dQ, dK, dV, recomputed QK^T and half of dP... see attention_flops) and the table says which.
Also one decode step (batch 64, caches of 512 and 2048 slots): bytes accessed per chip against
the weights' and the KV cache's bytes per chip (whether the cache read dominates a decode step).
Needs libtpu (pip install "jax[tpu]==0.10.2"). One compile at a time; about a minute each.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from jaxalign import models  # noqa: E402
from jaxalign.models import kv_cache, llama  # noqa: E402
from jaxalign.objectives import sft  # noqa: E402
from jaxalign.parallel import mesh as mesh_lib  # noqa: E402
from jaxalign.train import loop  # noqa: E402
from jaxalign.train.state import TrainState  # noqa: E402

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=True)
GIB = 1024**3


def compile_sft_step(cfg, devices, mesh_shape: tuple[int, int, int], batch: int, seq: int):
    """The SFT train step of cfg compiled for `devices` (a mesh (data, fsdp, tensor) of them) from
    abstract inputs: params / AdamW state / batch [batch, seq] in their shardings. Returns the
    jax Compiled."""
    mesh = jax.make_mesh(mesh_shape, mesh_lib.MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = mesh_lib.DEFAULT_AXIS_RULES
    module = models.causal_lm(cfg)
    tx = optax.adamw(1e-5)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # abstract: nothing may run eagerly on a compile-only mesh

    def init(rng):
        return module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]

    with mesh_lib.sharding_context(mesh, rules):
        param_shardings = mesh_lib.logical_shardings(jax.eval_shape(init, key), mesh, rules)
        abstract = jax.eval_shape(lambda r: TrainState.create(nn.meta.unbox(init(r)), tx, r), key)
    # Outside the mesh context: state_shardings runs tx.init eagerly (on abstract leaves).
    state = mesh_lib.with_shardings(abstract, mesh_lib.state_shardings(abstract, param_shardings, tx, mesh))
    with mesh_lib.sharding_context(mesh, rules):
        rows = mesh_lib.batch_sharding(mesh)
        inputs = {"input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rows),
                  "attention_mask": jax.ShapeDtypeStruct((batch, seq), jnp.bool_, sharding=rows),
                  "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.bool_, sharding=rows)}
        step = loop.make_train_step(sft.make_loss_fn(module), tx, 1)
        return jax.jit(step, donate_argnums=0).lower(state, [inputs]).compile()


def decode_step_bytes(devices, batch: int, slots: int) -> dict:
    """One decode step (one new token per row over a cache of `slots` slots; decoder.CausalLM
    .last_token_logits, the sampler's step) of the Llama-1B shapes in bf16 on `devices` (fsdp over
    all): the TPU compiler's bytes accessed per chip against the weights' and the KV cache's bytes
    per chip (the cache's batch is split over the chips)."""
    cfg = llama.LlamaConfig(**LLAMA_1B, dtype="bfloat16", param_dtype="bfloat16")
    mesh = jax.make_mesh((1, len(devices), 1), mesh_lib.MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = mesh_lib.DEFAULT_AXIS_RULES
    module = models.causal_lm(cfg)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)

    def init(rng):
        return module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]

    cache = jax.eval_shape(lambda: kv_cache.init_cache(cfg, batch, slots).replace(empty=False))
    rows = jax.sharding.NamedSharding(mesh, jax.P(mesh_lib.BATCH_AXES))
    cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
        mesh, jax.P(None, mesh_lib.BATCH_AXES) if x.ndim == 5 else (jax.P(mesh_lib.BATCH_AXES) if x.ndim else jax.P()))),
        cache)
    with mesh_lib.sharding_context(mesh, rules):
        params = jax.eval_shape(lambda r: nn.meta.unbox(init(r)), key)
        params = mesh_lib.with_shardings(params, mesh_lib.logical_shardings(jax.eval_shape(init, key), mesh, rules))
        ids = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=rows)
        mask = jax.ShapeDtypeStruct((batch, 1), jnp.bool_, sharding=rows)
        step = lambda p, ids, mask, cache: module.apply({"params": p}, ids, mask, cache=cache,  # noqa: E731
                                                        method=module.last_token_logits)
        compiled = jax.jit(step, donate_argnums=3).lower(params, ids, mask, cache).compile()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / len(devices)
    kv = sum(x.size * x.dtype.itemsize for x in (cache.k, cache.v)) / len(devices)
    return {"batch": batch, "slots": slots, "chips": len(devices),
            "bytes_accessed_per_chip": float(compiled.cost_analysis()["bytes accessed"]),
            "weight_bytes_per_chip": weights, "kv_cache_bytes_per_chip": kv,
            "temp_gib": compiled.memory_analysis().temp_size_in_bytes / GIB}


def attention_flops(cfg, batch: int, seq: int, backward: bool) -> float:
    """Matmul flops of causal attention over all layers (half of the T x T products): forward QK^T
    and PV; the backward recomputes QK^T and adds dP = dO V^T, dV, dQ, dK (splash's dq and dkv
    kernels each recompute QK^T: 2 + 2 + 4 products -> x4 the forward in total with it)."""
    fwd = 2 * 2 * batch * cfg.num_attention_heads * seq * seq * cfg.head_dim / 2 * cfg.num_hidden_layers
    return fwd * (4 if backward else 1)


def measure(devices, impl: str, seq: int, remat: str, batch: int) -> dict:
    cfg = llama.LlamaConfig(**LLAMA_1B, dtype="bfloat16", param_dtype="float32", remat_policy=remat,
                            attention_impl=impl)
    start = time.time()
    try:
        compiled = compile_sft_step(cfg, devices, (1, len(devices), 1), batch, seq)
    except jax.errors.JaxRuntimeError as error:  # the TPU compiler refuses a program over the chip's HBM
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return {"impl": impl, "seq": seq, "remat": remat, "batch": batch, "chips": len(devices),
                "does_not_fit": str(error).splitlines()[0], "compile_s": time.time() - start}
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    hlo = compiled.as_text()
    kernel_calls = hlo.count("tpu_custom_call")
    flops = float(cost["flops"])
    kernel_flops = attention_flops(cfg, batch, seq, True) / len(devices) if impl == "pallas" else 0.0
    return {
        "impl": impl, "seq": seq, "remat": remat, "batch": batch, "chips": len(devices),
        "argument_gib": memory.argument_size_in_bytes / GIB, "output_gib": memory.output_size_in_bytes / GIB,
        "temp_gib": memory.temp_size_in_bytes / GIB,
        "peak_gib": (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                     - memory.alias_size_in_bytes) / GIB,
        "xla_flops_per_chip": flops, "kernel_flops_per_chip": kernel_flops,
        "bytes_accessed_per_chip": float(cost["bytes accessed"]), "tpu_custom_calls": kernel_calls,
        "compile_s": time.time() - start,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out/benchmark_attention_tpu.json")
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--seqs", default="2048,4096")
    parser.add_argument("--remats", default="full,none")
    parser.add_argument("--parts", default="decode,train")
    parser.add_argument("--impls", default="xla,pallas")
    args = parser.parse_args()
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    rows, decode = [], []
    for slots in (512, 2048) if "decode" in args.parts else ():
        row = decode_step_bytes(devices, batch=64, slots=slots)
        print(json.dumps(row), flush=True)
        decode.append(row)
    for seq in (int(s) for s in args.seqs.split(",")) if "train" in args.parts else ():
        for remat in args.remats.split(","):
            for impl in args.impls.split(","):
                row = measure(devices, impl, seq, remat, batch=len(devices))
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"topology": args.topology, "device_kind": devices[0].device_kind, "model": LLAMA_1B,
                               "rows": rows, "decode": decode}, indent=1))


if __name__ == "__main__":
    main()
