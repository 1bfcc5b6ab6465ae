"""Llama (1/2/3/3.1/3.2) in Flax Linen: config, backbone, LM, KV cache, HF tensor map.

This is the one decoder implementation: the Qwen2/Qwen3 families (qwen.py) are LlamaConfig
subclasses that turn on its switches (qkv_bias: q/k/v biases without an o_proj bias; qk_norm:
per-head RMSNorm of q and k before RoPE). The building blocks are in layers.py.

Parameter tree (mirrors HF naming, see docs/architecture.md):

    Llama:      {"model": BACKBONE, "lm_head": {"kernel": [D, V]}}   (no lm_head when tied)
    BACKBONE:   {"embed_tokens": {"embedding": [V, D]},
                 "layers": LAYER (every leaf stacked [L, ...] when cfg.scan_layers),
                 "norm": {"scale": [D]}}
                with scan_layers=False the layers are "layers_0" ... "layers_{L-1}" instead.
    LAYER:      {"input_layernorm": {"scale": [D]},
                 "self_attn": {"q_proj": {"kernel": [D, H, Dh]}, "k_proj": {"kernel": [D, KV, Dh]},
                               "v_proj": {"kernel": [D, KV, Dh]}, "o_proj": {"kernel": [H, Dh, D]}},
                 "post_attention_layernorm": {"scale": [D]},
                 "mlp": {"gate_proj": {"kernel": [D, F]}, "up_proj": {"kernel": [D, F]},
                         "down_proj": {"kernel": [F, D]}}}
                (+ "bias" leaves when attention_bias / qkv_bias / mlp_bias;
                 + "self_attn": {"q_norm": {"scale": [Dh]}, "k_norm": {"scale": [Dh]}} when qk_norm).

Every parameter carries logical axis names (embed, mlp, heads, kv_heads, head_dim, vocab,
layers) and large activations are constrained by name (batch, length, embed, ...), so the
sharding rules in jaxalign/parallel/mesh.py can map them onto mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxalign.models import layer_loop, tensor_map
from jaxalign.models.attention import causal_attention
from jaxalign.models.layers import (  # noqa: F401  (re-exported: llama.Linear, llama.apply_rope, ...)
    MLP,
    Embed,
    Linear,
    RMSNorm,
    RopeScaling,
    parse_rope_scaling,
    apply_rope,
    rope_angles,
    rope_inv_freq,
)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "nothing_saveable": "nothing_saveable",
    "dots_saveable": "dots_saveable",
    "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable",
    "everything_saveable": "everything_saveable",
}
_REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama hyper-parameters (HF names) plus runtime fields (dtype, param_dtype, scan, remat).

    Frozen and hashable, so it can be a static argument of jit. The class is the family:
    `model_type` and `hf_architecture` are class constants (qwen.Qwen2Config / Qwen3Config
    subclass it), so a config can never disagree with its family.
    """

    model_type: ClassVar[str] = "llama"
    hf_architecture: ClassVar[str] = "LlamaForCausalLM"

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None -> num_attention_heads (MHA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v/o biases (HF Llama / Qwen3 attention_bias)
    mlp_bias: bool = False
    qkv_bias: bool = False  # q/k/v biases without an o_proj bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # Runtime fields (not in HF config.json).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    # q/k/v as one "qkv_proj" [D, KV, G+2, Dh] and gate/up as one "gate_up_proj" [D, F, 2]
    # (the decode layout made by layouts.fuse_projections; HF tensors are always the unfused ones).
    fused_projections: bool = False
    matmul_dtype: str | None = None  # matmul inputs (None: dtype); "int8" needs int8 kernels

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", parse_rope_scaling(dict(self.rope_scaling)))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(f"{field}={getattr(self, field)!r} is not one of {sorted(_DTYPES)}")
        if self.matmul_dtype not in (None, "float32", "bfloat16", "int8"):
            raise ValueError(f"matmul_dtype={self.matmul_dtype!r} is not one of None, float32, bfloat16, int8")
        if self.remat_policy not in _REMAT_POLICIES:
            raise ValueError(
                f"remat_policy={self.remat_policy!r} is not one of {sorted(_REMAT_POLICIES)}"
            )
        self._check_family()

    def _check_family(self) -> None:
        """Rejects switches this family's HF format cannot express (subclasses override)."""
        for switch in ("qkv_bias", "qk_norm"):
            if getattr(self, switch):
                raise ValueError(
                    f"{type(self).__name__}: {switch}=True is not part of HF Llama; "
                    "use qwen.Qwen2Config (qkv_bias) or qwen.Qwen3Config (qk_norm)"
                )

    @property
    def use_qkv_bias(self) -> bool:
        """Whether q/k/v projections have a bias (attention_bias or qkv_bias)."""
        return self.attention_bias or self.qkv_bias

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """EOS ids as a tuple (empty when none)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> "LlamaConfig":
        """Builds a config from an HF config.json dict (legacy rope_theta/rope_scaling or
        transformers-5 rope_parameters); `overrides` set any field (e.g. dtype, scan_layers).
        A config.json without model_type is read as this class's family."""
        hf = dict(hf)
        model_type = hf.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"model_type={model_type!r} is not {cls.model_type!r}: read it with "
                "hf.load_config or models.config_from_hf, which pick the family"
            )
        fields = cls._fields_from_hf(hf)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown {cls.__name__} overrides: {unknown}")
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def _fields_from_hf(cls, hf: dict) -> dict:
        """The dataclass fields of an HF config dict (subclasses adjust the family's keys)."""
        missing = [k for k in _REQUIRED_HF_KEYS if hf.get(k) is None]
        if missing:
            raise ValueError(f"HF config is missing required keys: {missing}")
        hidden_act = hf.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act={hidden_act!r}; only 'silu' is supported")
        attention_dropout = hf.get("attention_dropout") or 0.0
        if attention_dropout != 0.0:
            raise ValueError(f"unsupported attention_dropout={attention_dropout!r}; must be 0.0")
        pretraining_tp = hf.get("pretraining_tp") or 1
        if pretraining_tp != 1:
            raise ValueError(f"unsupported pretraining_tp={pretraining_tp!r}; must be 1")

        rope_theta = hf.get("rope_theta")
        rope = hf.get("rope_scaling")
        params = hf.get("rope_parameters")
        if params is not None:
            params = dict(params)
            if "rope_theta" in params:
                rope_theta = params.pop("rope_theta")
            if rope is None:
                rope = params
        rope_scaling = parse_rope_scaling(dict(rope)) if rope else None

        return dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=int(hf["num_attention_heads"]),
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf_config(self) -> dict:
        """The HF config.json dict for transformers' {hf_architecture} (LlamaForCausalLM here)."""
        eos = self.eos_token_id
        return {
            "architectures": [self.hf_architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "pretraining_tp": 1,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
        }

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions of left-padded rows: cumsum(mask) - 1, clipped at 0. [B, T] -> [B, T] int32."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def last_true_index(mask: jax.Array) -> jax.Array:
    """Index of the last True along the last axis (0 when none). mask: [B, T] -> [B] int32."""
    length = mask.shape[-1]
    reversed_first = jnp.argmax(jnp.flip(mask.astype(bool), axis=-1), axis=-1)
    return (length - 1 - reversed_first).astype(jnp.int32)


# ----------------------------------------------------------------------------- KV cache


@flax.struct.dataclass
class KVCache:
    """Decoding cache, laid out for the decode matmuls (keys transposed): k: L x [B, KV, Dh, S];
    v: L x [B, KV, S, Dh], a tuple of per-layer buffers, or one [L, ...] array each when the
    layers are scanned (the scan reads and writes it as it is: no per-step stacking of the
    cache); mask: [B, S] (slot holds a real token);
    index: int32 [] next slot to write (shared by the batch); lengths: [B] int32 real
    tokens seen per row (= the next position). `empty` (static) marks a fresh cache, so
    the prefill skips attending to its slots (none is valid)."""

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    mask: jax.Array
    index: jax.Array
    lengths: jax.Array
    empty: bool = flax.struct.field(pytree_node=False, default=False)


def init_cache(cfg: LlamaConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache with room for max_length tokens (prompt + generated) per row, stacked
    [L, ...] when cfg.scan_layers."""
    dtype = cfg.compute_dtype if dtype is None else dtype
    kv, dh, n = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    k, v = (batch_size, kv, dh, max_length), (batch_size, kv, max_length, dh)
    layers = (lambda shape: jnp.zeros((n, *shape), dtype)) if cfg.scan_layers else (
        lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(n)))
    return KVCache(
        k=layers(k),
        v=layers(v),
        mask=jnp.zeros((batch_size, max_length), bool),
        index=jnp.zeros((), jnp.int32),
        lengths=jnp.zeros((batch_size,), jnp.int32),
        empty=True,
    )


def grow_cache(cache: KVCache, max_length: int) -> KVCache:
    """The same cache with room for max_length >= its current slots (empty slots appended).
    The sampler decodes in segments, each over a cache only as long as that segment fills, so
    a step's attention reads the slots filled so far rather than the whole final length."""
    extra = max_length - cache.mask.shape[1]
    if extra < 0:
        raise ValueError(f"grow_cache: the cache already has {cache.mask.shape[1]} slots > max_length {max_length}")
    if extra == 0:  # no copy of the cache (one segment: the scanned, sharded decode)
        return cache
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == x.ndim + axis else 0) for a in range(x.ndim)])  # noqa: E731
    return cache.replace(k=jax.tree.map(lambda k: pad(k, -1), cache.k), v=jax.tree.map(lambda v: pad(v, -2), cache.v),
                         mask=pad(cache.mask, -1))


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of T new queries over a layer's whole cache (the new tokens already written).
    q [B, T, H, Dh] (scaled); k [B, KV, Dh, S], v [B, KV, S, Dh]; mask [B, T, S] -> [B, T, H, Dh].
    Both products are plain batched matmuls over (B, KV) on the cache as stored."""
    b, t, h, dh = q.shape
    kv = k.shape[1]
    g = h // kv
    qg = q.reshape(b, t, kv, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, dh)
    scores = jnp.matmul(qg, k.astype(q.dtype), preferred_element_type=jnp.float32)  # [B, KV, T*G, S]
    scores = scores.reshape(b, kv, t, g, -1)
    scores = jnp.where(mask[:, None, :, None, :], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, kv, t * g, -1)
    out = jnp.matmul(probs, v.astype(q.dtype), preferred_element_type=jnp.float32)  # [B, KV, T*G, Dh]
    return out.reshape(b, kv, t, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, h, dh).astype(q.dtype)


def _write_cache(k_cache, v_cache, k, v, index):
    """Writes this call's k, v [B, T, KV, Dh] at slot `index` of a layer's buffers."""
    k_cache = jax.lax.dynamic_update_slice(
        k_cache, k.transpose(0, 2, 3, 1).astype(k_cache.dtype), (0, 0, 0, index))
    v_cache = jax.lax.dynamic_update_slice(
        v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, index, 0))
    return k_cache, v_cache

# ----------------------------------------------------------------------------- modules


class Attention(nn.Module):
    """Self-attention with RoPE and GQA; writes this call's k, v into the layer's cache."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_mask, index, cache_kv):
        """x [B, T, D]; cos/sin [B, T, Dh/2]; mask [B, T, T] over the new tokens;
        cache_kv: None (no cache) or this layer's (k, v) buffers (KVCache layout), written at
        slot `index`; cache_mask: None (no cache, or an empty one: attend to the new tokens
        only) or [B, T, S] over the cache after the write.
        Returns (out [B, T, D], updated (k, v) buffers or None)."""
        cfg = self.cfg
        d, h, kv, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.use_qkv_bias
        if cfg.fused_projections:  # one matmul; per kv head: its G query heads, then k, then v
            g = h // kv
            qkv = Linear(cfg, (d,), (kv, g + 2, dh), ("embed", "kv_heads", None, "head_dim"), bias,
                         name="qkv_proj")(x)
            q = qkv[..., :g, :].reshape(x.shape[:2] + (h, dh))
            k, v = qkv[..., g, :], qkv[..., g + 1, :]
        else:
            q = Linear(cfg, (d,), (h, dh), ("embed", "heads", "head_dim"), bias, name="q_proj")(x)
            k = Linear(cfg, (d,), (kv, dh), ("embed", "kv_heads", "head_dim"), bias, name="k_proj")(x)
            v = Linear(cfg, (d,), (kv, dh), ("embed", "kv_heads", "head_dim"), bias, name="v_proj")(x)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's Dh, before RoPE
            q = RMSNorm(cfg, dh, "head_dim", name="q_norm")(q)
            k = RMSNorm(cfg, dh, "head_dim", name="k_norm")(k)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        q = apply_rope(q, cos, sin) * jnp.asarray(dh**-0.5, q.dtype)
        k = apply_rope(k, cos, sin)
        new_cache = None if cache_kv is None else _write_cache(*cache_kv, k, v, index)
        if cache_mask is None:
            out = causal_attention(q, k, v, mask)
        else:  # the cached slots and the new tokens, from the cache as written
            out = cache_attention(q, *new_cache, cache_mask)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        o_bias = cfg.attention_bias
        out = Linear(cfg, (h, dh), (d,), ("heads", "head_dim", "embed"), o_bias, name="o_proj")(out)
        return out, new_cache


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). Scan-compatible signature."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_mask, index, cache_kv):
        """x [B, T, D] -> (x [B, T, D], this layer's updated cache buffers or None)."""
        cfg = self.cfg
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = RMSNorm(cfg, name="input_layernorm")(x)
        attn, new_kv = Attention(cfg, name="self_attn")(h, cos, sin, mask, cache_mask, index, cache_kv)
        x = x + attn
        h = RMSNorm(cfg, name="post_attention_layernorm")(x)
        x = x + MLP(cfg, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, new_kv


def _layer_class(cfg: LlamaConfig):
    policy_name = _REMAT_POLICIES[cfg.remat_policy]
    if policy_name is None:
        return DecoderLayer
    policy = getattr(jax.checkpoint_policies, policy_name)
    return nn.remat(DecoderLayer, policy=policy, prevent_cse=not cfg.scan_layers)


class LlamaModel(nn.Module):
    """Backbone: embeddings, decoder layers, final norm.

    __call__(input_ids [B, T], attention_mask [B, T] (1 = real token) | None,
             positions [B, T] | None, cache KVCache | None)
      -> (hidden_states [B, T, D] after the final norm, updated cache or None).
    """

    cfg: LlamaConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = Embed(cfg)
        layer = _layer_class(cfg)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=cfg.num_hidden_layers,
                unroll=cfg.num_hidden_layers if layer_loop.unroll_training(cfg.hidden_size) else 1,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            self.layers = [layer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        cfg = self.cfg
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        mask = attention_mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(mask)
            if cache is not None:
                positions = jnp.where(
                    mask, positions + cache.lengths[:, None], cache.lengths[:, None]
                )
        cos, sin = rope_angles(cfg, positions)
        new_mask = jnp.tril(jnp.ones((t, t), bool))[None] & mask[:, None, :]
        index = cache_mask = None
        if cache is not None:
            index = cache.index
            full_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))
            if not cache.empty:  # query i sees the cache's real slots up to its own (index + i)
                slots = jnp.arange(full_mask.shape[1])[None, :] <= index + jnp.arange(t)[:, None]
                cache_mask = full_mask[:, None, :] & slots[None]

        x = self.embed_tokens(input_ids)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if cache is not None and isinstance(cache.k, tuple) == cfg.scan_layers:
            raise ValueError(f"the KV cache is {'per layer' if isinstance(cache.k, tuple) else 'stacked'} but "
                             f"scan_layers={cfg.scan_layers}: make it with init_cache of this config")
        if cfg.scan_layers:  # the stacked cache is the scan's per-layer input and output as it is
            x, new_kv = self.layers(x, cos, sin, new_mask, cache_mask, index,
                                    None if cache is None else (cache.k, cache.v))
        else:
            layer_kvs = []
            for i, layer in enumerate(self.layers):
                layer_kv = None if cache is None else (cache.k[i], cache.v[i])
                x, layer_kv = layer(x, cos, sin, new_mask, cache_mask, index, layer_kv)
                layer_kvs.append(layer_kv)
            new_kv = None if cache is None else (tuple(k for k, _ in layer_kvs), tuple(v for _, v in layer_kvs))
        x = self.norm(x)

        if cache is not None:
            cache = KVCache(
                k=new_kv[0],
                v=new_kv[1],
                mask=full_mask,
                index=cache.index + t,
                lengths=cache.lengths + jnp.sum(mask, axis=-1, dtype=jnp.int32),
            )
        return x, cache

    def attend(self, h):
        """Tied-embedding logits: h [B, T, D] -> [B, T, V] fp32."""
        return self.embed_tokens.attend(h)


@flax.struct.dataclass
class LlamaOutput:
    """logits [B, T, V] fp32; hidden_states [B, T, D] after the final norm; cache or None."""

    logits: jax.Array
    hidden_states: jax.Array
    cache: KVCache | None = None


CausalLMOutput = LlamaOutput  # the output of every family's causal LM


class Llama(nn.Module):
    """Causal LM: LlamaModel ("model") + lm_head (or tied embeddings). Returns LlamaOutput."""

    cfg: LlamaConfig

    def setup(self):
        cfg = self.cfg
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg, (cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"))

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, logits_from: int = 0) -> LlamaOutput:
        """logits_from > 0: logits of positions logits_from.. only ([B, T - logits_from, V]); RL needs
        them on the response slots alone, and the LM head is a large share of a small model's work."""
        h, cache = self.model(input_ids, attention_mask, positions, cache)
        logits = nn.with_logical_constraint(self.head(h[:, logits_from:]), ("batch", "length", "vocab"))
        return LlamaOutput(logits=logits, hidden_states=h, cache=cache)

    def head(self, h: jax.Array) -> jax.Array:
        """LM head: h [B, T, D] -> logits [B, T, V] fp32."""
        if self.cfg.tie_word_embeddings:
            return self.model.attend(h)
        return self.lm_head(h).astype(jnp.float32)

    def last_token_logits(self, input_ids, attention_mask=None, positions=None, cache=None):
        """Like __call__ but applies the head to the last column only (decoding):
        returns (logits [B, V] fp32, cache)."""
        h, cache = self.model(input_ids, attention_mask, positions, cache)
        return self.head(h[:, -1:])[:, 0], cache


# ----------------------------------------------------------------------------- params


def init_params(cfg: LlamaConfig, rng: jax.Array) -> dict:
    """Random parameters of Llama(cfg) (HF init: normal(initializer_range), norms 1) as a
    plain (unboxed) pytree."""
    init = _compiled_init(cfg, jax.ShapeDtypeStruct(rng.shape, rng.dtype))
    return nn.meta.unbox(init(rng, jnp.zeros((1, 1), jnp.int32))["params"])


@functools.lru_cache(maxsize=8)
def _compiled_init(cfg: LlamaConfig, rng_spec: jax.ShapeDtypeStruct):
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    lowered = jax.jit(Llama(cfg).init).lower(rng_spec, ids)
    n_params = sum(
        math.prod(x.shape) for x in jax.tree_util.tree_leaves(jax.eval_shape(Llama(cfg).init, rng_spec, ids))
    )
    options = {}
    if jax.default_backend() == "cpu" and n_params < 5_000_000:
        # The RNG code of the initializers takes XLA:CPU seconds to optimise; for small
        # models unoptimised code compiles ~3x faster and still runs in well under a second.
        options["xla_backend_optimization_level"] = 0
    return lowered.compile(compiler_options=options)


def resize_token_embeddings(cfg: LlamaConfig, params: dict, new_vocab_size: int):
    """Grows (new rows = mean of old rows) or truncates the vocabulary of embedding and
    untied lm_head. Returns (new cfg, new params); params are not modified in place."""
    old = cfg.vocab_size
    if new_vocab_size == old:
        return cfg, params

    def resize(table: jax.Array, axis: int) -> jax.Array:
        if new_vocab_size < old:
            return jax.lax.slice_in_dim(table, 0, new_vocab_size, axis=axis)
        mean = jnp.mean(table.astype(jnp.float32), axis=axis, keepdims=True).astype(table.dtype)
        extra = jnp.repeat(mean, new_vocab_size - old, axis=axis)
        return jnp.concatenate([table, extra], axis=axis)

    params = jax.tree_util.tree_map(lambda x: x, params)  # fresh containers
    params["model"] = dict(params["model"])
    params["model"]["embed_tokens"] = {
        "embedding": resize(params["model"]["embed_tokens"]["embedding"], 0)
    }
    if "lm_head" in params:
        params["lm_head"] = {"kernel": resize(params["lm_head"]["kernel"], 1)}
    return dataclasses.replace(cfg, vocab_size=new_vocab_size), params


# ----------------------------------------------------------------------------- HF tensor map


def hf_layer_map(cfg: LlamaConfig) -> list[tensor_map.HFTensor]:
    """The HF tensors of one LlamaDecoderLayer (`model.layers.N.<suffix>`) and where each
    lives in our layer params. Other families extend it (qwen.hf_layer_map)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    h, kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    proj_in, proj_out, vector = tensor_map.proj_in, tensor_map.proj_out, tensor_map.vector
    spec = [
        vector("input_layernorm.weight", ("input_layernorm", "scale"), (d,)),
        vector("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (d,)),
        proj_in("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), d, (h, dh)),
        proj_in("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), d, (kv, dh)),
        proj_in("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), d, (kv, dh)),
        proj_out("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (h, dh), d),
        proj_in("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), d, (f,)),
        proj_in("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), d, (f,)),
        proj_out("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (f,), d),
    ]
    if cfg.attention_bias:
        spec += [
            vector("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), (h, dh)),
            vector("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), (kv, dh)),
            vector("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), (kv, dh)),
            vector("self_attn.o_proj.bias", ("self_attn", "o_proj", "bias"), (d,)),
        ]
    if cfg.mlp_bias:
        spec += [
            vector("mlp.gate_proj.bias", ("mlp", "gate_proj", "bias"), (f,)),
            vector("mlp.up_proj.bias", ("mlp", "up_proj", "bias"), (f,)),
            vector("mlp.down_proj.bias", ("mlp", "down_proj", "bias"), (d,)),
        ]
    return spec
