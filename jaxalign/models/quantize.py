"""Lower-precision decode weights (bf16, int8 through qwix) and the matmul that reads them.

    cfg16, params16 = quantize.decode_weights(cfg, params, "bfloat16", families.of(cfg).weights.kernels)
    y = quantize.matmul(cfg, x, w)          # x [N, K] @ w [K, M] (an array or a qwix QArray)

Only the projection kernels (by param key: the family's families.LayerWeights.kernels) and an
untied lm_head change precision; embeddings, norms and biases stay as they are. Modes (measured on
XLA:CPU in experiments/benchmark_llama.py):
- "float32": unchanged (exact).
- "bfloat16": kernels in bf16, matmul inputs in bf16, fp32 accumulation.
- "int8": int8 kernels with one fp32 scale per output channel (qwix absmax), and each row of the
  activations quantised to int8 on the fly: int8 x int8 dots with int32 accumulation.
- "int8_weight_only": the same int8 kernels; qwix dequantises them in front of an fp32 dot.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Iterable

import jax
import jax.numpy as jnp
import qwix

if TYPE_CHECKING:
    from jaxalign.models.config import DecoderConfig

MODES = ("float32", "bfloat16", "int8", "int8_weight_only")
# The matmul-input dtype of each mode (None = the compute dtype).
_MATMUL_DTYPE = {"float32": None, "bfloat16": "bfloat16", "int8": "int8", "int8_weight_only": None}


def is_quantized(w: Any) -> bool:
    return isinstance(w, qwix.QArray)


def matmul(cfg: "DecoderConfig", x: jax.Array, w, out=None) -> jax.Array:
    """x [N, K] @ w [K, M] -> [N, M] in `out` (default cfg.compute_dtype). The inputs go in
    cfg.matmul_dtype (the decode layout's; default: the compute dtype); a QArray w is int8 (see the
    module docstring)."""
    out = cfg.compute_dtype if out is None else out
    if is_quantized(w):
        if cfg.matmul_dtype == "int8":
            x = qwix.quantize(x.astype(jnp.float32), jnp.int8, channelwise_axes=(0,))
            # int32 accumulation (qwix picks it for int8 x int8); the result is dequantised to fp32.
            return qwix.dot(x, w, preferred_element_type=jnp.float32).astype(out)
        return qwix.dot(x.astype(w.dtype), w).astype(out)
    dtype = cfg.compute_dtype if cfg.matmul_dtype is None else jnp.dtype(cfg.matmul_dtype)
    return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=out)


def as_matrix(w, n_in: int, n_out: int):
    """A kernel [*in, *out] (array or QArray) as its [n_in, n_out] matrix."""
    return w.reshape(n_in, n_out)


def _quantize_kernel(w: jax.Array, n_contract: int, mode: str, stacked: bool):
    """stacked: w has a leading layer axis [L, ...] (scanned layers), scaled per layer."""
    if mode == "bfloat16":
        return w.astype(jnp.bfloat16)
    lead = int(stacked)
    out_axes = tuple(range(lead)) + tuple(range(lead + n_contract, w.ndim))
    return qwix.quantize(w.astype(jnp.float32), jnp.int8, channelwise_axes=out_axes)


def decode_weights(cfg: "DecoderConfig", params: dict, mode: str,
                   kernels: Iterable[tuple[str, int]]) -> tuple["DecoderConfig", dict]:
    """(cfg, params) with the projection kernels and untied lm_head in `mode` (one of MODES).
    cfg: in the decode layout (cfg.decode_layout set); params: a causal LM's, scanned ([L, ...]
    under "layers") or per-layer; kernels: (param key, leading axes contracted) of the family's
    projections. A tied embedding stays fp32 for int8 (it is also the token lookup) and goes to
    bf16 for "bfloat16"."""
    kernels = dict(kernels)
    if mode not in MODES:
        raise ValueError(f"decode weights {mode!r} is not one of {list(MODES)}")
    if mode == "float32":
        return cfg, params

    def convert(tree, stacked=False):
        out = {}
        for key, value in tree.items():
            if key in kernels and "kernel" in value:
                out[key] = {**value, "kernel": _quantize_kernel(value["kernel"], kernels[key], mode, stacked)}
            elif isinstance(value, dict):
                out[key] = convert(value, stacked or key == "layers")
            else:
                out[key] = value
        return out

    params = {**params, "model": convert(params["model"])}
    if "lm_head" in params:
        params["lm_head"] = {"kernel": _quantize_kernel(params["lm_head"]["kernel"], 1, mode, False)}
    elif mode == "bfloat16":
        table = params["model"]["embed_tokens"]["embedding"].astype(jnp.bfloat16)
        params["model"] = {**params["model"], "embed_tokens": {"embedding": table}}
    layout = dataclasses.replace(cfg.decode_layout, matmul_dtype=_MATMUL_DTYPE[mode])
    return dataclasses.replace(cfg, decode_layout=layout), params


def cast_to_compute(cfg: "DecoderConfig", params: dict) -> dict:
    """params with every leaf but the norm scales in cfg.compute_dtype when that is narrower than
    the stored dtype (fp32 params, bf16 compute): the same numbers the modules would convert to
    at every call, converted once."""
    dtype = cfg.compute_dtype

    def cast(path, x):
        name = getattr(path[-1], "key", None)
        narrower = jnp.dtype(dtype).itemsize < x.dtype.itemsize and jnp.issubdtype(x.dtype, jnp.floating)
        return x.astype(dtype) if narrower and name != "scale" else x

    return jax.tree_util.tree_map_with_path(cast, params)


def weight_bytes(params) -> int:
    """Bytes of every leaf (int8 values and their scales count as stored)."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
