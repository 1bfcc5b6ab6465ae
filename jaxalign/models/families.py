"""The model-family registry: HF `model_type` -> the family's spec.

    family = families.get("gemma2")                 # or families.of(cfg), families.for_hf_config(d)
    cfg = family.config_class.from_hf_config(config_json)
    lm = family.causal_lm(cfg)                      # a flax module following CausalLM below

The sampler, score models, HF I/O, the decode layout and quantisation use a family only through
this spec and the two module protocols below. A new family is one module (its config class: a
config.DecoderConfig subclass with model_type / hf_architecture / HF keys / hooks; its decoder layer
composing the shared blocks; decoder.Backbone and decoder.CausalLM subclasses naming it; its HF
layer tensor map) and one entry in FAMILIES (gemma.py is the example).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import jax

from jaxalign.models import decoder, gemma, kv_cache, layers, llama, qwen, tensor_map
from jaxalign.models.config import DecoderConfig


class CausalLM(Protocol):
    """What the sampler and the policy roles need of a causal-LM flax module (decoder.CausalLM):
    params {"model": BACKBONE, "lm_head": ...}; `cache` from the family's init_cache."""

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None) -> decoder.CausalLMOutput:
        """-> output with logits [B, T, V] fp32, hidden_states [B, T, D], cache."""

    def last_token_logits(self, input_ids, attention_mask=None, positions=None, cache=None):
        """-> (logits of the last column [B, V] fp32, cache)."""


class Backbone(Protocol):
    """What a score model needs of a backbone flax module (decoder.Backbone)."""

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        """-> (hidden_states [B, T, D] after the final norm, cache or None)."""


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """Where a family's decoder layer keeps the shared blocks' weights (param keys inside one layer,
    read by layouts.fuse_projections), and the projection kernels the decode layout may narrow
    (quantize.decode_weights: param key -> leading axes its matmul contracts)."""

    attention: str = "self_attn"  # a decoder.Attention
    mlp: str = "mlp"  # a layers.MLP
    kernels: tuple[tuple[str, int], ...] = decoder.ATTENTION_KERNELS + layers.MLP_KERNELS


@dataclasses.dataclass(frozen=True)
class Family:
    """config_class: the family's config (its model_type / hf_architecture class constants name
    it in config.json); hf_layer_map(cfg): the HF tensors of one decoder layer; causal_lm /
    backbone: flax module classes taking the config; weights: where the shared blocks' weights
    are; init_params(cfg, rng): random causal-LM params; init_cache(cfg, batch, max_length) /
    grow_cache(cache, max_length): the decoding cache."""

    config_class: type[DecoderConfig]
    hf_layer_map: Callable[[DecoderConfig], list[tensor_map.HFTensor]]
    causal_lm: Callable[..., CausalLM]
    backbone: Callable[..., Backbone]
    weights: LayerWeights = LayerWeights()
    init_params: Callable[[DecoderConfig, jax.Array], dict] = decoder.init_params
    init_cache: Callable[..., Any] = kv_cache.init_cache
    grow_cache: Callable[..., Any] = kv_cache.grow_cache

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    @property
    def architecture(self) -> str:
        """The HF causal-LM class name written to config.json "architectures"."""
        return self.config_class.hf_architecture

    @property
    def score_architecture(self) -> str:
        """The architecture name of a score-model dir ("LlamaForScore", "Qwen2ForScore", ...)."""
        return self.architecture.replace("ForCausalLM", "ForScore")


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(llama.LlamaConfig, llama.hf_layer_map, llama.Llama, llama.LlamaModel),
        Family(qwen.Qwen2Config, qwen.hf_layer_map, llama.Llama, llama.LlamaModel),
        Family(qwen.Qwen3Config, qwen.hf_layer_map, llama.Llama, llama.LlamaModel),
        Family(gemma.Gemma2Config, gemma.hf_layer_map, gemma.Gemma, gemma.GemmaModel),
        Family(gemma.Gemma3Config, gemma.hf_layer_map, gemma.Gemma, gemma.GemmaModel),
    )
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def get(model_type: str) -> Family:
    """The family of an HF model_type; a ValueError naming the supported ones otherwise."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"unsupported model_type={model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}")
    return family


def of(cfg: DecoderConfig) -> Family:
    """The family of a config object (by its class's model_type)."""
    family = get(getattr(cfg, "model_type", None))
    if type(cfg) is not family.config_class:
        raise TypeError(f"config of type {type(cfg).__name__} is not the {family.model_type} family's "
                        f"{family.config_class.__name__}")
    return family


def for_hf_config(hf_config: Mapping[str, Any]) -> Family:
    """The family of an HF config.json dict (no model_type: llama)."""
    return get(hf_config.get("model_type", "llama"))


def config_from_hf(hf_config: Mapping[str, Any], **overrides) -> DecoderConfig:
    """The family config of an HF config.json dict, chosen by its model_type; `overrides` set
    runtime fields (dtype, param_dtype, scan_layers, remat_policy, attention_impl) or any other field."""
    return for_hf_config(hf_config).config_class.from_hf_config(hf_config, **overrides)
