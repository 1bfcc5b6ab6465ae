"""Benchmark: jaxalign Llama (JAX) against transformers LlamaForCausalLM (torch) on CPU, fp32.

    python experiments/benchmark_llama.py --out out/benchmark_llama.json [--reps 5]

Measures, on one config (vocab 8192, hidden 512, intermediate 1408, 8 layers, 8 heads, 4 kv
heads, seq 512, batch 4): (a) train step (fwd + bwd + AdamW) tokens/s, (b) forward tokens/s,
(c) MFU of each against the fp32 matmul peak measured in the same run (2048^3, both
frameworks), (d) sampling tokens/s (batch 16, prompt 64, 128 new tokens) against HF
`generate` with its KV cache, for each decode-weights mode of the sampler (fp32, bf16, int8,
int8 weight-only), with the max |log-prob gap| between the sampler's log-probs and the fp32
trainer forward on the sampled sequences. Medians over --reps timed runs after warmup, jax and
torch runs interleaved; prints a markdown table and writes JSON.

    python experiments/benchmark_llama.py --metrics sample     # the decode rows only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from jaxalign.generate import sampler
from jaxalign.models import decoder, layer_loop, layouts, llama, quantize
from jaxalign.objectives import common, sft

CONFIG = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
)
BATCH, SEQ = 4, 512
SAMPLE_BATCH, PROMPT, NEW = 16, 64, 128


def timed_pair(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Median seconds of each fn() (each must block until its work is done). Runs are
    interleaved (a, b, a, b, ...) so that load from other processes hits both alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in tqdm.trange(reps, desc=" vs ".join(fns), unit="rep", leave=False):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def model_flops_per_token(cfg: llama.LlamaConfig, seq: int) -> float:
    """Forward matmul FLOPs per token: 2 * matmul params + attention scores and values
    (full T x T, the PaLM convention). A train step is 3x this."""
    d, f, h, kv, dh = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                       cfg.num_key_value_heads, cfg.head_dim)
    per_layer = d * h * dh * 2 + 2 * d * kv * dh + 3 * d * f
    matmul_params = cfg.num_hidden_layers * per_layer + d * cfg.vocab_size
    attention = 2 * 2 * cfg.num_hidden_layers * seq * h * dh
    return 2 * matmul_params + attention


# ----------------------------------------------------------------------------- JAX


def jax_peak_fn():
    a = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (2048, 2048), jnp.float32)
    mm = jax.jit(jnp.dot)
    return lambda: mm(a, b).block_until_ready()


def jax_fns(cfg: llama.LlamaConfig) -> dict:
    """Callables for the train step, forward and sampling of jaxalign's Llama."""
    model = llama.Llama(cfg)
    params = decoder.init_params(cfg, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (BATCH, SEQ), 0, cfg.vocab_size)
    tx = optax.adamw(1e-4, weight_decay=0.0)

    def loss_fn(params, ids):  # the SFT loss over every token, as HF's labels=input_ids
        logits = model.apply({"params": params}, ids).logits
        return sft.sft_loss(logits, ids, jnp.ones(ids.shape, bool))[0]

    @jax.jit
    def train_step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = [params, tx.init(params)]

    def train():
        state[0], state[1], loss = train_step(state[0], state[1], ids)
        loss.block_until_ready()

    @jax.jit
    def forward_fn(p, x):
        with layer_loop.forward_only():  # the layer loop rolled: faster for a forward alone on XLA:CPU
            return model.apply({"params": p}, x).logits

    prompt = jax.random.randint(jax.random.PRNGKey(2), (SAMPLE_BATCH, PROMPT), 0, cfg.vocab_size)
    mask = jnp.ones_like(prompt, bool)
    sampling = sampler.SamplingConfig(max_new_tokens=NEW, temperature=1.0, pad_token_id=0)
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 1000))

    def sampler_fn(mode):
        config = dataclasses.replace(sampling, weights=mode)
        return lambda: sampler.sample(params, cfg, prompt, mask, next(keys), config).sequences.block_until_ready()

    prefill_only = dataclasses.replace(sampling, max_new_tokens=1)  # the prompt's forward + one draw
    matrices = decode_matrices(cfg, params)
    floor = jax.jit(lambda ms: jax.lax.fori_loop(0, NEW, lambda _, x: decode_matmul_step(ms, x, jnp),
                                                 jnp.full((SAMPLE_BATCH, cfg.hidden_size), 0.01)))
    fns = {
        "train": train,
        "forward": lambda: forward_fn(params, ids).block_until_ready(),
        "peak": jax_peak_fn(),
        "floor_decode_matmuls": lambda: floor(matrices).block_until_ready(),
        "floor_prefill": lambda: sampler.sample(params, cfg, prompt, mask, next(keys),
                                                prefill_only).sequences.block_until_ready(),
    }
    fns.update({_sample_metric(mode): sampler_fn(mode) for mode in quantize.MODES})
    return fns


def decode_matrices(cfg: llama.LlamaConfig, params) -> list:
    """What one fp32 decode step must read, as arrays: per layer [qkv, o, gate_up, down] (the
    sampler's decode-layout kernels as 2-D matrices) and the layer's K and V cache filled to the
    average length of a sampling run (PROMPT + NEW / 2 slots; k [B, KV, Dh, S], v [B, KV, S, Dh]),
    then the lm_head."""
    _, dparams = layouts.decode_params(cfg, params, "float32")
    model = dparams["model"]
    as_2d = lambda w, n_in: np.asarray(w).reshape(int(np.prod(w.shape[:n_in])), -1)  # noqa: E731
    rng = np.random.default_rng(0)
    kv, dh, filled = cfg.num_key_value_heads, cfg.head_dim, PROMPT + NEW // 2
    out = []
    for i in range(cfg.num_hidden_layers):
        attn, mlp = model[f"layers_{i}"]["self_attn"], model[f"layers_{i}"]["mlp"]
        out += [as_2d(attn["qkv_proj"]["kernel"], 1), as_2d(attn["o_proj"]["kernel"], 2),
                as_2d(mlp["gate_up_proj"]["kernel"], 1), as_2d(mlp["down_proj"]["kernel"], 1),
                rng.standard_normal((SAMPLE_BATCH, kv, dh, filled), np.float32),
                rng.standard_normal((SAMPLE_BATCH, kv, filled, dh), np.float32)]
    head = dparams["lm_head"]["kernel"] if "lm_head" in dparams else model["embed_tokens"]["embedding"].T
    return out + [np.asarray(head)]


def decode_matmul_step(matrices: list, x, xp):
    """One decode step's products alone, x [rows, D] -> [rows, D] (xp: jax.numpy or torch): each
    layer's 16-row products on its real kernels and the two products over its filled KV cache,
    with only the reshapes and adds that chain them (no softmax, norms, RoPE, cache writes or
    sampling). Its time per step is the floor of an fp32 decode step on this machine."""
    rows, d = x.shape
    *layers, head = matrices
    for i in range(0, len(layers), 6):
        qkv, o, gate_up, down, k, v = layers[i:i + 6]
        kv, dh, filled = k.shape[1:]
        q = (x @ qkv)[:, : o.shape[0]].reshape(rows, kv, -1, dh)  # the query heads of each kv head
        attended = ((q @ k) @ v) / filled  # [rows, KV, G, Dh]
        x = x + attended.reshape(rows, -1) @ o
        f = down.shape[0]
        gu = (x @ gate_up).reshape(rows, f, 2)  # gate_up columns interleave (f, gate|up)
        x = x + (gu[:, :, 0] * gu[:, :, 1]) @ down
    x = (x @ head)[:, :d]
    return x / ((x * x).mean() + 1e-6) ** 0.5  # unit scale: no denormals over the steps (torch does not flush them)


def _sample_metric(mode: str) -> str:
    return "sample" if mode == "float32" else f"sample_{mode}"


def log_prob_gaps(cfg: llama.LlamaConfig, reps: int = 2) -> dict:
    """Max |sampler log-prob - fp32 trainer-forward log-prob| over the sampled tokens of `reps`
    benchmark-size batches, per decode-weights mode."""
    model = llama.Llama(cfg)
    params = decoder.init_params(cfg, jax.random.PRNGKey(0))
    prompt = jax.random.randint(jax.random.PRNGKey(2), (SAMPLE_BATCH, PROMPT), 0, cfg.vocab_size)
    mask = jnp.ones_like(prompt, bool)
    forward = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m).logits)
    gaps = {}
    for mode in quantize.MODES:
        config = sampler.SamplingConfig(max_new_tokens=NEW, temperature=1.0, pad_token_id=0, weights=mode)
        worst = 0.0
        for rep in range(reps):
            out = sampler.sample(params, cfg, prompt, mask, jax.random.PRNGKey(100 + rep), config)
            logits = forward(params, out.sequences, out.sequence_mask)[:, PROMPT - 1 : -1]
            trainer = common.token_log_probs(logits, out.sequences[:, PROMPT:])
            gap = jnp.abs(jnp.where(out.response_mask, trainer - out.log_probs, 0.0)).max()
            worst = max(worst, float(gap))
        gaps[mode] = worst
    return gaps


def torch_fns(cfg: llama.LlamaConfig) -> dict:
    """The same callables for transformers.LlamaForCausalLM (sampling = `generate` with cache)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_config()))
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def train():
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids).logits

    prompt = torch.randint(0, cfg.vocab_size, (SAMPLE_BATCH, PROMPT))

    def sample():
        model.eval()
        with torch.no_grad():
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                use_cache=True,
                pad_token_id=0,
            )

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matrices = [torch.from_numpy(np.array(m)) for m in decode_matrices(cfg, decoder.init_params(cfg, jax.random.PRNGKey(0)))]

    def floor_decode_matmuls():
        with torch.no_grad():
            x = torch.full((SAMPLE_BATCH, cfg.hidden_size), 0.01)
            for _ in range(NEW):
                x = decode_matmul_step(matrices, x, torch)

    return {"train": train, "forward": forward, "sample": sample, "peak": lambda: torch.mm(a, b),
            "floor_decode_matmuls": floor_decode_matmuls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/benchmark_llama.json")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--metrics", default="peak,train,forward,sample",
                        help="comma-separated subset of peak,train,forward,sample")
    args = parser.parse_args()
    chosen = args.metrics.split(",")
    unknown = sorted(set(chosen) - {"peak", "train", "forward", "sample"})
    if unknown:
        parser.error(f"--metrics: unknown {unknown}; choose from peak,train,forward,sample")

    cfg = llama.LlamaConfig(**CONFIG)
    flops_token = model_flops_per_token(cfg, SEQ)
    tokens = BATCH * SEQ
    fns = {"jax": jax_fns(cfg)}
    if not args.skip_torch:
        fns["torch"] = torch_fns(cfg)
    seconds = {name: {} for name in fns}
    for metric in ("peak", "train", "forward", "sample"):
        if metric not in chosen:
            continue
        if metric == "sample":  # every decode mode and HF generate, interleaved
            reps = max(3, args.reps // 2)
            pair = {f"{name} {m}": f[m] for name, f in fns.items() for m in f if m.startswith(("sample", "floor"))}
            # int8 weight-only is ~10x slower on XLA:CPU (the dequantised kernels are materialised
            # every step): one timed run after warmup is enough to place it.
            slow = "jax sample_int8_weight_only"
            got = timed_pair({slow: pair.pop(slow)}, 1)
            seconds["jax"]["sample_int8_weight_only"] = got[slow]
        else:
            reps = args.reps
            pair = {f"{name} {metric}": f[metric] for name, f in fns.items()}
        got = timed_pair(pair, reps, warmup=2 if metric == "peak" else 1)
        for key, value in got.items():
            name, m = key.split(" ")
            seconds[name][m] = value
    results = {"jax": {}, "torch": {}}
    for name, sec in seconds.items():
        out = results[name]
        if "peak" in sec:
            out["peak_flops"] = 2 * 2048**3 / sec["peak"]
        if "train" in sec:
            out["train_tokens_per_s"] = tokens / sec["train"]
        if "forward" in sec:
            out["forward_tokens_per_s"] = tokens / sec["forward"]
        for m, value in sec.items():
            if m.startswith("sample"):
                out[f"{m}_tokens_per_s"] = SAMPLE_BATCH * NEW / value
                out[f"{m}_ms_per_step"] = 1e3 * value / NEW
            if m.startswith("floor"):
                out[f"{m}_ms_per_step"] = 1e3 * value / NEW
        if "peak" in sec and "train" in sec:
            out["train_mfu"] = 3 * flops_token * out["train_tokens_per_s"] / out["peak_flops"]
        if "peak" in sec and "forward" in sec:
            out["forward_mfu"] = flops_token * out["forward_tokens_per_s"] / out["peak_flops"]
    if "sample" in chosen:
        results["jax"]["sample_log_prob_gap"] = log_prob_gaps(cfg)
    results["config"] = dict(CONFIG, batch=BATCH, seq=SEQ, dtype="float32",
                             sample=dict(batch=SAMPLE_BATCH, prompt=PROMPT, new_tokens=NEW))
    results["machine"] = {"platform": platform.platform(), "jax": jax.__version__,
                          "devices": str(jax.devices())}

    rows = [
        ("train tokens/s", "train_tokens_per_s", "{:,.0f}"),
        ("train MFU (of measured peak)", "train_mfu", "{:.1%}"),
        ("forward tokens/s", "forward_tokens_per_s", "{:,.0f}"),
        ("forward MFU", "forward_mfu", "{:.1%}"),
        ("sampling tokens/s", "sample_tokens_per_s", "{:,.0f}"),
        ("fp32 matmul peak GFLOP/s", "peak_flops", "{:.0f}"),
    ]
    print("| metric | jax | torch | jax/torch |\n|---|---|---|---|")
    for label, key, fmt in rows:
        jv, tv = results["jax"].get(key), results["torch"].get(key)
        if jv is None:
            continue
        scale = 1e-9 if key == "peak_flops" else 1
        ratio = f"{jv / tv:.2f}x" if tv else "-"
        print(f"| {label} | {fmt.format(jv * scale)} | {fmt.format(tv * scale) if tv else '-'} | {ratio} |")
    if "sample" in chosen:
        hf = results["torch"].get("sample_tokens_per_s")
        print("\n| decode weights | tokens/s | ms/step | vs HF generate (fp32) | max abs log-prob gap |"
              "\n|---|---|---|---|---|")
        for mode in quantize.MODES:
            m = _sample_metric(mode)
            tps, ms = results["jax"][f"{m}_tokens_per_s"], results["jax"][f"{m}_ms_per_step"]
            ratio = f"{tps / hf:.2f}x" if hf else "-"
            print(f"| {mode} | {tps:,.0f} | {ms:.1f} | {ratio} | {results['jax']['sample_log_prob_gap'][mode]:.2e} |")
        if hf:
            print(f"| HF generate fp32 | {hf:,.0f} | {results['torch']['sample_ms_per_step']:.1f} | 1.00x | - |")
        jx, th = results["jax"], results["torch"]
        # The best any fp32 sampler can do here: the prompt's forward, then NEW steps of matmuls alone.
        best_ms = jx["floor_prefill_ms_per_step"] + jx["floor_decode_matmuls_ms_per_step"]
        jx["fp32_ceiling_vs_hf"] = th["sample_ms_per_step"] / best_ms if hf else None
        print(f"\nfp32 floor per step: the decode products alone {jx['floor_decode_matmuls_ms_per_step']:.1f} ms (jax)"
              + (f", {th['floor_decode_matmuls_ms_per_step']:.1f} ms (torch)" if hf else "")
              + f"; the prompt's forward {jx['floor_prefill_ms_per_step']:.1f} ms per generated token"
              + (f"; fp32 ceiling vs HF generate: {jx['fp32_ceiling_vs_hf']:.2f}x" if hf else ""))
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
