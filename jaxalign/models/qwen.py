"""Qwen2 / Qwen2.5 and Qwen3: configs and HF tensor maps over Llama's decoder (llama.py).

    cfg, params = hf.from_pretrained(path)                  # model_type "qwen2" or "qwen3"
    out = models.causal_lm(cfg).apply({"params": params}, input_ids, attention_mask=mask)

Both families are Llama's pre-norm SwiGLU decoder layer (llama.DecoderLayer) with their own
attention options (config.AttentionOptions):
- Qwen2 (and Qwen2.5, which shares model_type "qwen2"): q/k/v projections have biases, o_proj
  has none; no attention_bias / mlp_bias keys.
- Qwen3: no biases unless `attention_bias` (then on q/k/v/o, as in Llama); a per-head RMSNorm
  over head_dim on q and k before RoPE (params self_attn.q_norm / k_norm).
Sliding-window attention (use_sliding_window: true, or any "sliding_attention" layer) is not
implemented and is rejected. A Qwen3 config.json without head_dim means 128, as in transformers.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxalign.models import llama
from jaxalign.models.config import AttentionOptions


def _check_no_sliding_window(hf: dict) -> None:
    if hf.get("use_sliding_window"):
        raise ValueError(
            "use_sliding_window=true is not supported (sliding-window attention is not implemented); "
            "set use_sliding_window to false"
        )
    sliding = [i for i, kind in enumerate(hf.get("layer_types") or []) if kind != "full_attention"]
    if sliding:
        raise ValueError(f"layer_types: layers {sliding} are not 'full_attention'; only full attention is supported")


def _qwen_hf_config(cfg: llama.LlamaConfig) -> dict:
    """Llama's config.json dict with the keys Qwen configs do not have dropped and the
    sliding-window keys (off) added."""
    out = llama.LlamaConfig.to_hf_config(cfg)
    for key in ("pretraining_tp", "mlp_bias"):
        out.pop(key)
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_hidden_layers)
    return out


@dataclasses.dataclass(frozen=True)
class Qwen2Config(llama.LlamaConfig):
    """Qwen2 / Qwen2.5 (transformers Qwen2ForCausalLM): q/k/v biases, no o_proj bias."""

    model_type: ClassVar[str] = "qwen2"
    hf_architecture: ClassVar[str] = "Qwen2ForCausalLM"

    def __post_init__(self):
        super().__post_init__()
        wrong = {k: v for k, v in dict(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias).items() if v}
        if wrong:
            raise ValueError(f"Qwen2Config: {wrong} is not Qwen2 (always q/k/v biases, no o_proj or MLP bias)")

    @property
    def attention_options(self) -> AttentionOptions:
        return AttentionOptions(qkv_bias=True)

    @classmethod
    def _fields_from_hf(cls, hf: dict) -> dict:
        _check_no_sliding_window(hf)
        # transformers' Qwen2 ignores attention_bias / mlp_bias: q/k/v biases always, no others.
        hf = {k: v for k, v in hf.items() if k not in ("attention_bias", "mlp_bias")}
        return super()._fields_from_hf(hf)

    def to_hf_config(self) -> dict:
        """The HF config.json dict for transformers.Qwen2ForCausalLM."""
        out = _qwen_hf_config(self)
        out.pop("attention_bias")
        return out


@dataclasses.dataclass(frozen=True)
class Qwen3Config(llama.LlamaConfig):
    """Qwen3 (transformers Qwen3ForCausalLM): per-head q/k RMSNorm; biases only with attention_bias."""

    model_type: ClassVar[str] = "qwen3"
    hf_architecture: ClassVar[str] = "Qwen3ForCausalLM"

    def __post_init__(self):
        super().__post_init__()
        if self.mlp_bias:
            raise ValueError("Qwen3Config: {'mlp_bias': True} is not Qwen3 (biases only through attention_bias)")

    @property
    def attention_options(self) -> AttentionOptions:
        return AttentionOptions(qkv_bias=self.attention_bias, o_bias=self.attention_bias, qk_norm=True)

    @classmethod
    def _fields_from_hf(cls, hf: dict) -> dict:
        _check_no_sliding_window(hf)
        hf = {k: v for k, v in hf.items() if k != "mlp_bias"}  # transformers' Qwen3 MLP has no bias
        hf.setdefault("head_dim", 128)  # transformers' Qwen3Config default
        return super()._fields_from_hf(hf)

    def to_hf_config(self) -> dict:
        """The HF config.json dict for transformers.Qwen3ForCausalLM."""
        return _qwen_hf_config(self)


hf_layer_map = llama.hf_layer_map  # the same layer: biases and q/k norms follow attention_options
