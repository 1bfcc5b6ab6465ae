"""Parameter layouts of every family's decoder: scanned <-> per-layer layers, unfused (HF-shaped) <->
fused q/k/v and gate/up projections of the shared blocks (decoder.Attention, layers.MLP, found in a
layer under the keys the family names: families.LayerWeights), and the decode layout the sampler
builds once per call. The trained and exported tree is always the scanned (or per-layer), unfused one."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from jaxalign.models import families, layer_loop, quantize
from jaxalign.models.config import DecodeLayout, DecoderConfig


def unstack_layers(params: Mapping) -> dict:
    """Scanned layout (params["model"]["layers"] leaves [L, ...]) -> per-layer layout
    (params["model"]["layers_{i}"]), the params of the same model with scan_layers=False."""
    backbone = dict(params["model"])
    layers = backbone.pop("layers")
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    for i in range(n):
        backbone[f"layers_{i}"] = jax.tree_util.tree_map(lambda x: x[i], layers)
    return {**params, "model": backbone}


def stack_layers(params: Mapping) -> dict:
    """Inverse of unstack_layers: per-layer layout -> scanned layout."""
    backbone = dict(params["model"])
    names = sorted((k for k in backbone if k.startswith("layers_")), key=lambda k: int(k[7:]))
    layers = [backbone.pop(k) for k in names]
    backbone["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return {**params, "model": backbone}


def _map_layers(params: Mapping, fn) -> dict:
    """params with fn applied to every layer's params (scanned "layers" or "layers_{i}")."""
    backbone = {k: fn(v) if k == "layers" or k.startswith("layers_") else v
                for k, v in params["model"].items()}
    return {**params, "model": backbone}


def fuse_projections(cfg: DecoderConfig, params: Mapping) -> dict:
    """Unfused -> fused layout (the params of the same model in the decode layout):
    q/k/v kernels [D, H, Dh], [D, KV, Dh] x2 -> "qkv_proj" [D, KV, G+2, Dh] (per kv head its G
    query heads, then k, then v; biases likewise [KV, G+2, Dh]); gate/up [D, F] -> "gate_up_proj"
    [D, F, 2]. Scanned ([L, ...]) or per-layer params. A copy of those weights."""
    kv, g = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    names = families.of(cfg).weights

    def qkv(q, k, v):
        q = q.reshape(q.shape[:-2] + (kv, g, q.shape[-1]))
        return jnp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)

    def layer(p):
        attn, mlp = dict(p[names.attention]), dict(p[names.mlp])
        parts = [attn.pop(n) for n in ("q_proj", "k_proj", "v_proj")]
        attn["qkv_proj"] = {leaf: qkv(*(part[leaf] for part in parts)) for leaf in parts[0]}
        gate, up = mlp.pop("gate_proj"), mlp.pop("up_proj")
        mlp["gate_up_proj"] = {leaf: jnp.stack([gate[leaf], up[leaf]], axis=-1) for leaf in gate}
        return {**p, names.attention: attn, names.mlp: mlp}

    return _map_layers(params, layer)


def unfuse_projections(cfg: DecoderConfig, params: Mapping) -> dict:
    """Inverse of fuse_projections (fused -> the HF-shaped q/k/v and gate/up params)."""
    h, g = cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    names = families.of(cfg).weights

    def layer(p):
        attn, mlp = dict(p[names.attention]), dict(p[names.mlp])
        fused = attn.pop("qkv_proj")
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            attn[name] = {}
            for leaf, x in fused.items():
                if name == "q_proj":
                    attn[name][leaf] = x[..., :g, :].reshape(x.shape[:-3] + (h, x.shape[-1]))
                else:
                    attn[name][leaf] = x[..., g + i - 1, :]
        gate_up = mlp.pop("gate_up_proj")
        mlp["gate_proj"] = {leaf: x[..., 0] for leaf, x in gate_up.items()}
        mlp["up_proj"] = {leaf: x[..., 1] for leaf, x in gate_up.items()}
        return {**p, names.attention: attn, names.mlp: mlp}

    return _map_layers(params, layer)


def decode_params(cfg: DecoderConfig, params: Mapping, weights: str = "float32") -> tuple[DecoderConfig, dict]:
    """(cfg, params) of the same model in the decode layout: unrolled layers (when layer_loop.unroll_layers;
    else they stay scanned), fused projections, weights in the compute dtype when that is narrower (bf16 compute of fp32
    params), kernels in `weights` (quantize.MODES; "float32" is exact). Made once per sample
    call (a copy of the weights), so no decode step concatenates or converts weights."""
    scan_layers = cfg.scan_layers and not layer_loop.unroll_layers()  # see layer_loop.unroll_layers
    if cfg.scan_layers and not scan_layers:
        params = unstack_layers(params)
    if cfg.decode_layout is None:
        params = fuse_projections(cfg, params)
    cfg = dataclasses.replace(cfg, scan_layers=scan_layers, decode_layout=cfg.decode_layout or DecodeLayout(),
                              remat_policy="none")
    kernels = families.of(cfg).weights.kernels
    return quantize.decode_weights(cfg, quantize.cast_to_compute(cfg, params), weights, kernels)
