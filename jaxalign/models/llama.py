"""Llama (1/2/3/3.1/3.2): its config (HF LlamaConfig keys), its pre-norm decoder layer, HF tensor map.

    cfg, params = hf.from_pretrained(path)                  # model_type "llama"
    out = Llama(cfg).apply({"params": params}, input_ids, attention_mask=mask)

The layer composes the shared blocks (decoder.Attention, layers.MLP, layers.RMSNorm); the backbone,
causal LM, cache and init are decoder.py's. Qwen2 / Qwen3 (qwen.py) reuse this layer with their own
attention options. Parameter tree: decoder.py's, with LAYER:

    {"input_layernorm": {"scale": [D]}, "self_attn": ATTENTION, "post_attention_layernorm": {"scale": [D]},
     "mlp": {"gate_proj": {"kernel": [D, F]}, "up_proj": {"kernel": [D, F]}, "down_proj": {"kernel": [F, D]}}}
    (+ "bias" leaves when attention_bias / mlp_bias)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn

from jaxalign.models import decoder, tensor_map
from jaxalign.models.config import AttentionOptions, DecoderConfig
from jaxalign.models.layers import MLP, RMSNorm, mlp_hf_tensors


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    """Llama hyper-parameters (HF names) plus the shared runtime fields (config.DecoderConfig)."""

    model_type: ClassVar[str] = "llama"
    hf_architecture: ClassVar[str] = "LlamaForCausalLM"

    attention_bias: bool = False  # q/k/v/o biases
    mlp_bias: bool = False

    @property
    def attention_options(self) -> AttentionOptions:
        return AttentionOptions(qkv_bias=self.attention_bias, o_bias=self.attention_bias)

    @classmethod
    def _fields_from_hf(cls, hf: dict) -> dict:
        hidden_act = hf.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act={hidden_act!r}; only 'silu' is supported")
        pretraining_tp = hf.get("pretraining_tp") or 1
        if pretraining_tp != 1:
            raise ValueError(f"unsupported pretraining_tp={pretraining_tp!r}; must be 1")
        return dict(super()._fields_from_hf(hf), attention_bias=bool(hf.get("attention_bias", False)),
                    mlp_bias=bool(hf.get("mlp_bias", False)))

    def to_hf_config(self) -> dict:
        """The HF config.json dict for transformers' {hf_architecture} (LlamaForCausalLM here)."""
        return dict(super().to_hf_config(), hidden_act="silu", attention_bias=self.attention_bias,
                    mlp_bias=self.mlp_bias, pretraining_tp=1)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). Scan-compatible signature."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, inputs: decoder.LayerInputs, cache_kv, kind):
        """x [B, T, D] -> (x [B, T, D], this layer's updated cache buffers or None)."""
        cfg = self.cfg
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = RMSNorm(cfg, name="input_layernorm")(x)
        attn, new_kv = decoder.Attention(cfg, name="self_attn")(h, inputs, cache_kv, kind)
        x = x + attn
        h = RMSNorm(cfg, name="post_attention_layernorm")(x)
        x = x + MLP(cfg, use_bias=cfg.mlp_bias, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, new_kv


class LlamaModel(decoder.Backbone):
    """Llama's backbone: embeddings, DecoderLayer stack, final RMSNorm (decoder.Backbone)."""

    layer_class = DecoderLayer


class Llama(decoder.CausalLM):
    """Causal LM: LlamaModel ("model") + lm_head (or tied embeddings). Returns decoder.CausalLMOutput."""

    backbone_class = LlamaModel


def hf_layer_map(cfg: LlamaConfig) -> list[tensor_map.HFTensor]:
    """The HF tensors of one LlamaDecoderLayer (`model.layers.N.<suffix>`) and where each lives in
    our layer params (Qwen2 / Qwen3 layers too: their biases and q/k norms follow their attention
    options)."""
    d = cfg.hidden_size
    return [
        tensor_map.vector("input_layernorm.weight", ("input_layernorm", "scale"), (d,)),
        tensor_map.vector("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (d,)),
        *decoder.attention_hf_tensors(cfg),
        *mlp_hf_tensors(cfg, cfg.mlp_bias),
    ]
