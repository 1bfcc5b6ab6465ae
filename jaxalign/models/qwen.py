"""Qwen2 / Qwen2.5 and Qwen3: configs and HF tensor maps over Llama's decoder (llama.py).

    cfg, params = hf.from_pretrained(path)                  # model_type "qwen2" or "qwen3"
    out = models.causal_lm(cfg).apply({"params": params}, input_ids, attention_mask=mask)

Both families are Llama's pre-norm SwiGLU decoder with two switches of llama.LlamaConfig:
- Qwen2 (and Qwen2.5, which shares model_type "qwen2"): q/k/v projections have biases, o_proj
  has none (`qkv_bias=True`); no attention_bias / mlp_bias keys.
- Qwen3: no biases unless `attention_bias` (then on q/k/v/o, as in Llama); a per-head RMSNorm
  over head_dim on q and k before RoPE (`qk_norm=True`, params self_attn.q_norm / k_norm).
Sliding-window attention (use_sliding_window: true, or any "sliding_attention" layer) is not
implemented and is rejected. A Qwen3 config.json without head_dim means 128, as in transformers.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxalign.models import llama, tensor_map


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

    qkv_bias: bool = True

    def _check_family(self) -> None:
        wrong = {
            k: v
            for k, v in dict(qkv_bias=self.qkv_bias, attention_bias=self.attention_bias, mlp_bias=self.mlp_bias,
                             qk_norm=self.qk_norm).items()
            if v != (k == "qkv_bias")
        }
        if wrong:
            raise ValueError(
                f"Qwen2Config: {wrong} is not Qwen2 (always q/k/v biases, no o_proj or MLP bias, no qk_norm)"
            )

    @classmethod
    def _fields_from_hf(cls, hf: dict) -> dict:
        _check_no_sliding_window(hf)
        # transformers' Qwen2 ignores attention_bias / mlp_bias: q/k/v biases always, no others.
        hf = {k: v for k, v in hf.items() if k not in ("attention_bias", "mlp_bias")}
        return dict(super()._fields_from_hf(hf), qkv_bias=True)

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

    qk_norm: bool = True

    def _check_family(self) -> None:
        wrong = {
            k: v
            for k, v in dict(qk_norm=self.qk_norm, qkv_bias=self.qkv_bias, mlp_bias=self.mlp_bias).items()
            if v != (k == "qk_norm")
        }
        if wrong:
            raise ValueError(
                f"Qwen3Config: {wrong} is not Qwen3 (always qk_norm; biases only through attention_bias)"
            )

    @classmethod
    def _fields_from_hf(cls, hf: dict) -> dict:
        _check_no_sliding_window(hf)
        hf = {k: v for k, v in hf.items() if k != "mlp_bias"}  # transformers' Qwen3 MLP has no bias
        hf.setdefault("head_dim", 128)  # transformers' Qwen3Config default
        return dict(super()._fields_from_hf(hf), qk_norm=True)

    def to_hf_config(self) -> dict:
        """The HF config.json dict for transformers.Qwen3ForCausalLM."""
        return _qwen_hf_config(self)


def hf_layer_map(cfg: llama.LlamaConfig) -> list[tensor_map.HFTensor]:
    """HF tensors of one Qwen2/Qwen3 decoder layer: Llama's, plus the q/k/v biases (Qwen2) and
    the q/k norms (Qwen3)."""
    spec = llama.hf_layer_map(cfg)
    kv, h, dh = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    if cfg.qkv_bias and not cfg.attention_bias:
        spec += [
            tensor_map.vector("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), (h, dh)),
            tensor_map.vector("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), (kv, dh)),
            tensor_map.vector("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), (kv, dh)),
        ]
    if cfg.qk_norm:
        spec += [
            tensor_map.vector("self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), (dh,)),
            tensor_map.vector("self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), (dh,)),
        ]
    return spec
