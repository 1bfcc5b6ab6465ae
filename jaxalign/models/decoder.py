"""The decoder body every family composes: the attention layer, the backbone (embeddings, the layer
stack, final norm, KV cache) and the causal LM (backbone + LM head), plus init and vocabulary resize.

A family owns its decoder layer and names it (llama.py, gemma.py):

    class GemmaModel(decoder.Backbone):              # embeddings, scanned layers, final norm, cache
        layer_class = GemmaDecoderLayer              # __call__(x, inputs, cache_kv, kind) -> (x, cache_kv)
        norm_class = GemmaRMSNorm                    # the final norm
    class Gemma(decoder.CausalLM):                   # + lm_head (or tied embeddings)
        backbone_class = GemmaModel

The layer composes the shared blocks (Attention below; layers.MLP, layers.RMSNorm) or its own. What
differs between layers of one model (a sliding window, a RoPE base) comes from the config's
attention_kinds / layer_kinds and reaches Attention through LayerInputs.of_kind.

Parameter tree (mirrors HF naming, see docs/architecture.md):

    CausalLM:   {"model": BACKBONE, "lm_head": {"kernel": [D, V]}}   (no lm_head when tied)
    BACKBONE:   {"embed_tokens": {"embedding": [V, D]}, "layers": LAYER (every leaf stacked [L, ...]
                 when cfg.scan_layers; else "layers_0" ... "layers_{L-1}"), "norm": {"scale": [D]}}
    Attention:  {"q_proj": {"kernel": [D, H, Dh]}, "k_proj" / "v_proj": {"kernel": [D, KV, Dh]},
                 "o_proj": {"kernel": [H, Dh, D]}} (+ "bias" leaves, + "q_norm" / "k_norm": {"scale": [Dh]})

Every parameter carries logical axis names (embed, mlp, heads, kv_heads, head_dim, vocab, layers)
and large activations are constrained by name (batch, length, embed, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxalign import models
from jaxalign.models import attention, attention_kernels, kv_cache, layer_loop, tensor_map
from jaxalign.models.config import REMAT_POLICIES
from jaxalign.models.layers import Embed, Linear, RMSNorm, apply_rope, rope_angles
from jaxalign.models.masks import positions_from_mask

if TYPE_CHECKING:
    from jaxalign.models.config import DecoderConfig

NO_WINDOW = attention_kernels.NO_WINDOW  # a global layer's window when the windows of a scanned stack are traced
# The attention's projection kernels (both layouts) by param key -> leading axes the matmul contracts.
ATTENTION_KERNELS = (("qkv_proj", 1), ("q_proj", 1), ("k_proj", 1), ("v_proj", 1), ("o_proj", 2))


@flax.struct.dataclass
class LayerInputs:
    """What every decoder layer reads besides x and its cache, made once per call by the backbone.
    cos / sin: per attention kind, [B, T, Dh/2] fp32; mask [B, T, T] over the new tokens (causal and
    real); cache_mask [B, T, S] over the cache after the write (None: no cache, or an empty one:
    attend to the new tokens only); index: the cache slot of the first new token (None: no cache);
    windows (static): per attention kind, its sliding window or None."""

    cos: tuple[jax.Array, ...]
    sin: tuple[jax.Array, ...]
    mask: jax.Array
    cache_mask: jax.Array | None
    index: jax.Array | None
    windows: tuple[int | None, ...] = flax.struct.field(pytree_node=False)

    def of_kind(self, kind) -> tuple[jax.Array, jax.Array, Any]:
        """(cos, sin, window) of attention kind `kind`: a Python int, None (kind 0) or a traced int32
        (a scanned stack's per-layer input: the window is then traced, NO_WINDOW for a global kind)."""
        if len(self.cos) == 1 or kind is None:
            return self.cos[0], self.sin[0], self.windows[0]
        if isinstance(kind, int):
            return self.cos[kind], self.sin[kind], self.windows[kind]
        windows = jnp.asarray([NO_WINDOW if w is None else w for w in self.windows], jnp.int32)
        return jnp.stack(self.cos)[kind], jnp.stack(self.sin)[kind], windows[kind]


class Attention(nn.Module):
    """Self-attention with RoPE and GQA, shaped by cfg.attention_options (biases, per-head q/k norm,
    query scale, logit softcap) and the layer's attention kind (RoPE, sliding window); writes this
    call's k, v into the layer's cache. norm_class: the per-head q/k norm's module."""

    cfg: DecoderConfig
    norm_class: Any = RMSNorm

    @nn.compact
    def __call__(self, x, inputs: LayerInputs, cache_kv, kind):
        """x [B, T, D]; cache_kv: None (no cache), this layer's (k, v) buffers (kv_cache layout) or
        its kv_cache.LayerSlot in the stacked buffers, written at slot inputs.index; kind: see
        LayerInputs.of_kind. Returns (out [B, T, D], cache_kv updated, of the same kind, or None)."""
        cfg, options = self.cfg, self.cfg.attention_options
        d, h, kv, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = options.qkv_bias
        if cfg.decode_layout is not None:  # one matmul; per kv head: its G query heads, then k, then v
            g = h // kv
            qkv = Linear(cfg, (d,), (kv, g + 2, dh), ("embed", "kv_heads", None, "head_dim"), bias,
                         name="qkv_proj")(x)
            q = qkv[..., :g, :].reshape(x.shape[:2] + (h, dh))
            k, v = qkv[..., g, :], qkv[..., g + 1, :]
        else:
            q = Linear(cfg, (d,), (h, dh), ("embed", "heads", "head_dim"), bias, name="q_proj")(x)
            k = Linear(cfg, (d,), (kv, dh), ("embed", "kv_heads", "head_dim"), bias, name="k_proj")(x)
            v = Linear(cfg, (d,), (kv, dh), ("embed", "kv_heads", "head_dim"), bias, name="v_proj")(x)
        if options.qk_norm:  # a norm over each head's Dh, before RoPE
            q = self.norm_class(cfg, dh, "head_dim", name="q_norm")(q)
            k = self.norm_class(cfg, dh, "head_dim", name="k_norm")(k)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        cos, sin, window = inputs.of_kind(kind)
        scale = dh**-0.5 if options.query_scale is None else options.query_scale
        q = apply_rope(q, cos, sin) * jnp.asarray(scale, q.dtype)
        k = apply_rope(k, cos, sin)
        new_cache = None if cache_kv is None else kv_cache.write_layer(cache_kv, k, v, inputs.index)
        if inputs.cache_mask is None:
            out = attention.causal_attention(q, k, v, inputs.mask, window=window, softcap=options.softcap,
                                             impl=cfg.attention_impl, windows=inputs.windows)
        else:  # the cached slots and the new tokens, from the cache as written
            out = attention.cache_attention(q, *kv_cache.layer_buffers(new_cache), inputs.cache_mask, inputs.index, window=window,
                                            softcap=options.softcap)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = Linear(cfg, (h, dh), (d,), ("heads", "head_dim", "embed"), options.o_bias, name="o_proj")(out)
        return out, new_cache


def attention_hf_tensors(cfg: DecoderConfig, prefix: str = "self_attn") -> list[tensor_map.HFTensor]:
    """The HF tensors of an Attention at `prefix` of a layer (HF *Attention: q/k/v/o_proj, their
    biases and q_norm / k_norm as cfg.attention_options has them)."""
    d, h, kv, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    options = cfg.attention_options
    at = lambda name, leaf: (prefix, name, leaf)  # noqa: E731
    spec = [
        tensor_map.proj_in(f"{prefix}.q_proj.weight", at("q_proj", "kernel"), d, (h, dh)),
        tensor_map.proj_in(f"{prefix}.k_proj.weight", at("k_proj", "kernel"), d, (kv, dh)),
        tensor_map.proj_in(f"{prefix}.v_proj.weight", at("v_proj", "kernel"), d, (kv, dh)),
        tensor_map.proj_out(f"{prefix}.o_proj.weight", at("o_proj", "kernel"), (h, dh), d),
    ]
    if options.qkv_bias:
        spec += [tensor_map.vector(f"{prefix}.{name}.bias", at(name, "bias"), (n, dh))
                 for name, n in (("q_proj", h), ("k_proj", kv), ("v_proj", kv))]
    if options.o_bias:
        spec.append(tensor_map.vector(f"{prefix}.o_proj.bias", at("o_proj", "bias"), (d,)))
    if options.qk_norm:
        spec += [tensor_map.vector(f"{prefix}.{name}.weight", at(name, "scale"), (dh,)) for name in ("q_norm", "k_norm")]
    return spec


def _remat(layer_class, cfg: DecoderConfig):
    policy_name = REMAT_POLICIES[cfg.remat_policy]
    if policy_name is None:
        return layer_class
    policy = getattr(jax.checkpoint_policies, policy_name)
    return nn.remat(layer_class, policy=policy, prevent_cse=not cfg.scan_layers)


class Backbone(nn.Module):
    """Embeddings, decoder layers, final norm. A family subclasses it with its layer_class (and
    norm_class, `embed`).

    __call__(input_ids [B, T], attention_mask [B, T] (1 = real token) | None,
             positions [B, T] | None, cache KVCache | None)
      -> (hidden_states [B, T, D] after the final norm, updated cache or None).
    """

    cfg: DecoderConfig

    # Class attributes (not fields) a family's subclass sets: its decoder layer and final norm.
    layer_class = None
    norm_class = RMSNorm

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = Embed(cfg)
        layer = _remat(self.layer_class, cfg)
        if cfg.scan_layers:  # one module whose params are stacked [L, ...] by the scan in __call__
            self.layers = layer(cfg)
        else:
            self.layers = [layer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = self.norm_class(cfg)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, T] -> the first layer's input [B, T, D] (Gemma scales it by sqrt(D))."""
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        cfg = self.cfg
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        mask = attention_mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(mask)
            if cache is not None:
                positions = jnp.where(mask, positions + cache.lengths[:, None], cache.lengths[:, None])
        angles = [rope_angles(cfg.head_dim, kind.rope_theta, kind.rope_scaling, positions) for kind in cfg.attention_kinds]
        new_mask = jnp.tril(jnp.ones((t, t), bool))[None] & mask[:, None, :]
        index = cache_mask = None
        if cache is not None:
            index = cache.index
            full_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))
            if not cache.empty:  # query i sees the cache's real slots up to its own (index + i)
                slots = jnp.arange(full_mask.shape[1])[None, :] <= index + jnp.arange(t)[:, None]
                cache_mask = full_mask[:, None, :] & slots[None]
        inputs = LayerInputs(cos=tuple(c for c, _ in angles), sin=tuple(s for _, s in angles), mask=new_mask,
                             cache_mask=cache_mask, index=index,
                             windows=tuple(kind.window for kind in cfg.attention_kinds))

        x = nn.with_logical_constraint(self.embed(input_ids), ("batch", "length", "embed"))
        if cache is not None and isinstance(cache.k, tuple) == cfg.scan_layers:
            raise ValueError(f"the KV cache is {'per layer' if isinstance(cache.k, tuple) else 'stacked'} but "
                             f"scan_layers={cfg.scan_layers}: make it with init_cache of this config")
        if cfg.scan_layers:  # the stacked cache rides in the scan's carry: each layer writes its columns in place
            kinds = jnp.asarray(cfg.layer_kinds, jnp.int32) if len(cfg.attention_kinds) > 1 else None
            slot = None if cache is None else kv_cache.LayerSlot(cache.k, cache.v, jnp.zeros((), jnp.int32))
            x, slot = self._scan_layers(x, slot, inputs, kinds)
            new_kv = None if cache is None else (slot.k, slot.v)
        else:
            layer_kvs = []
            for i, layer in enumerate(self.layers):
                layer_kv = None if cache is None else (cache.k[i], cache.v[i])
                x, layer_kv = layer(x, inputs, layer_kv, cfg.layer_kinds[i])
                layer_kvs.append(layer_kv)
            new_kv = None if cache is None else (tuple(k for k, _ in layer_kvs), tuple(v for _, v in layer_kvs))
        x = self.norm(x)

        if cache is not None:
            cache = kv_cache.KVCache(
                k=new_kv[0],
                v=new_kv[1],
                mask=full_mask,
                index=cache.index + t,
                lengths=cache.lengths + jnp.sum(mask, axis=-1, dtype=jnp.int32),
            )
        return x, cache

    def _scan_layers(self, x, slot, inputs: LayerInputs, kinds):
        """The scanned stack: x [B, T, D] and slot (a kv_cache.LayerSlot or None) carried through
        the layers, kinds [L] int32 (or None) their per-layer input. Returns (x, slot)."""
        cfg = self.cfg

        def body(layer, carry, inputs, kind):
            x, slot = carry
            x, slot = layer(x, inputs, slot, kind)
            return (x, None if slot is None else slot.replace(layer=slot.layer + 1)), None

        scan = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, 0),
            length=cfg.num_hidden_layers,
            unroll=cfg.num_hidden_layers if layer_loop.unroll_training(cfg.hidden_size) else 1,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        (x, slot), _ = scan(self.layers, (x, slot), inputs, kinds)
        return x, slot

    def attend(self, h):
        """Tied-embedding logits: h [B, T, D] -> [B, T, V] fp32."""
        return self.embed_tokens.attend(h)


@flax.struct.dataclass
class CausalLMOutput:
    """logits [B, T, V] fp32; hidden_states [B, T, D] after the final norm; cache or None."""

    logits: jax.Array
    hidden_states: jax.Array
    cache: kv_cache.KVCache | None = None


class CausalLM(nn.Module):
    """Causal LM: the family's backbone ("model") + lm_head (or tied embeddings). A family subclasses
    it with its backbone_class (and overrides `head` for a final logit softcap)."""

    cfg: DecoderConfig

    backbone_class = None  # a class attribute (not a field) a family's subclass sets: its Backbone

    def setup(self):
        cfg = self.cfg
        self.model = self.backbone_class(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg, (cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"))

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, logits_from: int = 0) -> CausalLMOutput:
        """logits_from > 0: logits of positions logits_from.. only ([B, T - logits_from, V]); RL needs
        them on the response slots alone, and the LM head is a large share of a small model's work."""
        h, cache = self.model(input_ids, attention_mask, positions, cache)
        logits = nn.with_logical_constraint(self.head(h[:, logits_from:]), ("batch", "length", "vocab"))
        return CausalLMOutput(logits=logits, hidden_states=h, cache=cache)

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


def init_params(cfg: DecoderConfig, rng: jax.Array) -> dict:
    """Random parameters of cfg's causal LM (each block's own initialisers: HF's normal(initializer_range)
    projections and embeddings, the family's norm init) as a plain (unboxed) pytree."""
    init = _compiled_init(cfg, jax.ShapeDtypeStruct(rng.shape, rng.dtype))
    return nn.meta.unbox(init(rng, jnp.zeros((1, 1), jnp.int32))["params"])


@functools.lru_cache(maxsize=8)
def _compiled_init(cfg: DecoderConfig, rng_spec: jax.ShapeDtypeStruct):
    module = models.causal_lm(cfg)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    lowered = jax.jit(module.init).lower(rng_spec, ids)
    n_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(jax.eval_shape(module.init, rng_spec, ids)))
    options = {}
    if jax.default_backend() == "cpu" and n_params < 5_000_000:
        # The RNG code of the initializers takes XLA:CPU seconds to optimise; for small
        # models unoptimised code compiles ~3x faster and still runs in well under a second.
        options["xla_backend_optimization_level"] = 0
    return lowered.compile(compiler_options=options)


def resize_token_embeddings(cfg: DecoderConfig, params: dict, new_vocab_size: int):
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
    params["model"]["embed_tokens"] = {"embedding": resize(params["model"]["embed_tokens"]["embedding"], 0)}
    if "lm_head" in params:
        params["lm_head"] = {"kernel": resize(params["lm_head"]["kernel"], 1)}
    return dataclasses.replace(cfg, vocab_size=new_vocab_size), params
