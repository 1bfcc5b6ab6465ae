"""Gemma 2 and Gemma 3 (text): their configs, norm, decoder layer, backbone, causal LM and HF tensor map.

    cfg, params = hf.from_pretrained(path)       # model_type "gemma2" or "gemma3_text" (Gemma3ForCausalLM)
    out = models.causal_lm(cfg).apply({"params": params}, input_ids, attention_mask=mask)

What Gemma changes, following transformers' modeling_gemma2.py / modeling_gemma3.py:
- RMSNorm multiplies by (1 + weight), the weight initialised to 0 (GemmaRMSNorm);
- the embeddings are scaled by sqrt(hidden_size) before the first layer (GemmaModel.embed);
- a sandwich layer: the attention and MLP outputs are normalised again before their residual add
  (post_attention_layernorm, post_feedforward_layernorm; the MLP input has pre_feedforward_layernorm);
- a GeGLU MLP (hidden_activation gelu_pytorch_tanh) and queries scaled by query_pre_attn_scalar^-0.5;
- sliding-window layers among global ones (layer_types; by default Gemma 2 alternates, starting with a
  sliding one, and Gemma 3 has 5 sliding layers per global one);
- logits soft-capped (final_logit_softcapping: cap * tanh(logits / cap)); Gemma 2 also caps the
  attention scores (attn_logit_softcapping);
- Gemma 3: per-head q/k norms, and its sliding layers use their own RoPE base (rope_local_base_freq,
  transformers-5 rope_parameters["sliding_attention"]) while rope_theta / rope_scaling are the global
  layers'. transformers' Gemma 3 attention ignores attn_logit_softcapping: a config that sets it is refused.
The embeddings are usually tied (tie_word_embeddings). Parameter tree: decoder.py's, with LAYER
{"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm":
{"scale": [D]}, "self_attn": ATTENTION, "mlp": {"gate_proj", "up_proj", "down_proj"}}.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxalign.models import decoder, tensor_map
from jaxalign.models.config import AttentionKind, AttentionOptions, DecoderConfig, parse_rope_scaling
from jaxalign.models.layers import ACTIVATIONS, MLP, RMSNorm, mlp_hf_tensors

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class _GemmaConfig(DecoderConfig):
    """The keys Gemma 2 and Gemma 3 share (HF names and transformers' defaults)."""

    sliding_pattern: ClassVar[int]  # without layer_types: every sliding_pattern-th layer is global

    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = 0
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: int = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None  # None: the family's default pattern
    final_logit_softcapping: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is None:
            pattern = self.sliding_pattern
            types = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        name = type(self).__name__
        # transformers' strict config classes take these types only (256.0 or a softcap of 30 is refused there).
        if float(self.query_pre_attn_scalar) != int(self.query_pre_attn_scalar):
            raise ValueError(f"{name}: query_pre_attn_scalar={self.query_pre_attn_scalar!r} must be an integer")
        object.__setattr__(self, "query_pre_attn_scalar", int(self.query_pre_attn_scalar))
        for field in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(self, field, None) is not None:
                object.__setattr__(self, field, float(getattr(self, field)))
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {SLIDING, FULL}:
            raise ValueError(f"{name}: layer_types must be {self.num_hidden_layers} of {[SLIDING, FULL]}, "
                             f"got {list(self.layer_types)}")
        if SLIDING in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            raise ValueError(f"{name}: sliding_window={self.sliding_window!r} must be a positive number of tokens "
                             "when a layer is a sliding_attention one")
        if self.hidden_activation not in ACTIVATIONS:
            raise ValueError(f"{name}: unsupported hidden_activation={self.hidden_activation!r}; "
                             f"supported: {sorted(ACTIVATIONS)}")

    @property
    def attention_kinds(self) -> tuple[AttentionKind, ...]:
        return tuple(self._kind(t) for t in sorted(set(self.layer_types)))

    @property
    def layer_kinds(self) -> tuple[int, ...]:
        types = sorted(set(self.layer_types))
        return tuple(types.index(t) for t in self.layer_types)

    def _kind(self, layer_type: str) -> AttentionKind:
        window = self.sliding_window if layer_type == SLIDING else None
        return AttentionKind(self.rope_theta, self.rope_scaling, window)

    @classmethod
    def _fields_from_hf(cls, hf: dict) -> dict:
        if hf.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=true is not supported (a causal LM); set it to false")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        hf = dict(hf)
        hf.setdefault("head_dim", 256)  # transformers' Gemma2Config / Gemma3TextConfig defaults
        hf.setdefault("num_key_value_heads", 4)
        fields = super()._fields_from_hf(hf)
        pattern = hf.get("sliding_window_pattern", cls.sliding_pattern)
        for key in ("attention_bias", "hidden_activation", "query_pre_attn_scalar", "sliding_window",
                    "final_logit_softcapping"):
            fields[key] = hf.get(key, defaults[key])
        fields["attention_bias"] = bool(fields["attention_bias"])
        layer_types = hf.get("layer_types") or [
            SLIDING if (i + 1) % pattern else FULL for i in range(fields["num_hidden_layers"])]
        fields["layer_types"] = tuple(layer_types)
        return fields

    def to_hf_config(self) -> dict:
        return dict(super().to_hf_config(), attention_bias=self.attention_bias,
                    hidden_activation=self.hidden_activation, query_pre_attn_scalar=self.query_pre_attn_scalar,
                    sliding_window=self.sliding_window, layer_types=list(self.layer_types),
                    final_logit_softcapping=self.final_logit_softcapping)


@dataclasses.dataclass(frozen=True)
class Gemma2Config(_GemmaConfig):
    """Gemma 2 (transformers Gemma2ForCausalLM): attention and final logits soft-capped."""

    model_type: ClassVar[str] = "gemma2"
    hf_architecture: ClassVar[str] = "Gemma2ForCausalLM"
    sliding_pattern: ClassVar[int] = 2

    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0

    @property
    def attention_options(self) -> AttentionOptions:
        return AttentionOptions(qkv_bias=self.attention_bias, o_bias=self.attention_bias,
                                query_scale=self.query_pre_attn_scalar**-0.5, softcap=self.attn_logit_softcapping)

    @classmethod
    def _fields_from_hf(cls, hf: dict) -> dict:
        return dict(super()._fields_from_hf(hf), attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0))

    def to_hf_config(self) -> dict:
        """The HF config.json dict for transformers.Gemma2ForCausalLM."""
        return dict(super().to_hf_config(), attn_logit_softcapping=self.attn_logit_softcapping)


@dataclasses.dataclass(frozen=True)
class Gemma3Config(_GemmaConfig):
    """Gemma 3 text (transformers Gemma3ForCausalLM, model_type gemma3_text): q/k norms, a local RoPE
    base for the sliding layers, 5 sliding layers per global one."""

    model_type: ClassVar[str] = "gemma3_text"
    hf_architecture: ClassVar[str] = "Gemma3ForCausalLM"
    sliding_pattern: ClassVar[int] = 6

    rope_theta: float = 1_000_000.0  # the global layers'
    max_position_embeddings: int = 131_072
    rope_local_base_freq: float = 10_000.0  # the sliding layers' RoPE base (no scaling)

    @property
    def attention_options(self) -> AttentionOptions:
        return AttentionOptions(qkv_bias=self.attention_bias, o_bias=self.attention_bias, qk_norm=True,
                                query_scale=self.query_pre_attn_scalar**-0.5)

    def _kind(self, layer_type: str) -> AttentionKind:
        if layer_type == SLIDING:
            return AttentionKind(self.rope_local_base_freq, None, self.sliding_window)
        return AttentionKind(self.rope_theta, self.rope_scaling, None)

    @classmethod
    def _fields_from_hf(cls, hf: dict) -> dict:
        if hf.get("attn_logit_softcapping") is not None:
            raise ValueError(f"attn_logit_softcapping={hf['attn_logit_softcapping']!r}: transformers' Gemma 3 "
                             "attention ignores it; set it to null")
        hf = dict(hf)
        local_theta = hf.get("rope_local_base_freq", 10_000.0)
        params = hf.get("rope_parameters")
        if isinstance(params, dict) and {SLIDING, FULL} & set(params):  # transformers 5: one per layer type
            sliding = dict(params.get(SLIDING) or {})
            local_theta = sliding.pop("rope_theta", local_theta)
            if sliding and parse_rope_scaling(sliding) is not None:
                raise ValueError(f"rope_parameters[{SLIDING!r}]: RoPE scaling of the sliding layers is not "
                                 f"supported, got {sliding}")
            hf["rope_parameters"] = params.get(FULL) or {"rope_type": "default"}
        return dict(super()._fields_from_hf(hf), rope_local_base_freq=float(local_theta))

    def to_hf_config(self) -> dict:
        """The HF config.json dict for transformers.Gemma3ForCausalLM."""
        return dict(super().to_hf_config(), rope_local_base_freq=self.rope_local_base_freq,
                    attn_logit_softcapping=None)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: normalised x * (1 + scale), scale initialised to 0 (transformers Gemma2RMSNorm)."""

    init_scale = staticmethod(nn.initializers.zeros)

    @staticmethod
    def gain(scale):
        return 1.0 + scale


class GemmaDecoderLayer(nn.Module):
    """Sandwich block: x + post_attn_norm(attn(input_norm(x))), then x + post_ffw_norm(mlp(pre_ffw_norm(x)))."""

    cfg: _GemmaConfig

    @nn.compact
    def __call__(self, x, inputs: decoder.LayerInputs, cache_kv, kind):
        """x [B, T, D] -> (x [B, T, D], this layer's updated cache buffers or None)."""
        cfg = self.cfg
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = GemmaRMSNorm(cfg, name="input_layernorm")(x)
        attn, new_kv = decoder.Attention(cfg, norm_class=GemmaRMSNorm, name="self_attn")(h, inputs, cache_kv, kind)
        x = x + GemmaRMSNorm(cfg, name="post_attention_layernorm")(attn)
        h = MLP(cfg, activation=cfg.hidden_activation, name="mlp")(GemmaRMSNorm(cfg, name="pre_feedforward_layernorm")(x))
        x = x + GemmaRMSNorm(cfg, name="post_feedforward_layernorm")(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), new_kv


class GemmaModel(decoder.Backbone):
    """Gemma's backbone: embeddings scaled by sqrt(hidden_size), GemmaDecoderLayer stack, final GemmaRMSNorm."""

    layer_class = GemmaDecoderLayer
    norm_class = GemmaRMSNorm

    def embed(self, input_ids):
        x = self.embed_tokens(input_ids)
        return x * jnp.asarray(self.cfg.hidden_size**0.5, x.dtype)  # transformers: the normaliser in the weights' dtype


class Gemma(decoder.CausalLM):
    """Causal LM: GemmaModel ("model") + the (usually tied) LM head, logits soft-capped."""

    backbone_class = GemmaModel

    def head(self, h):
        logits = super().head(h)
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)


def hf_layer_map(cfg: _GemmaConfig) -> list[tensor_map.HFTensor]:
    """The HF tensors of one Gemma2DecoderLayer / Gemma3DecoderLayer and where each lives in our layer params."""
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    return [
        *(tensor_map.vector(f"{name}.weight", (name, "scale"), (cfg.hidden_size,)) for name in norms),
        *decoder.attention_hf_tensors(cfg),
        *mlp_hf_tensors(cfg, False),
    ]
