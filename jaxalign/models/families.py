"""The model-family registry: HF `model_type` -> the family's spec.

    family = families.get("qwen3")                 # or families.of(cfg), families.for_hf_config(d)
    cfg = family.config_class.from_hf_config(config_json)
    lm = family.causal_lm(cfg)                     # a flax module following CausalLM below

The sampler, score models and HF I/O use a family only through this spec and the two module
protocols below, so a new family is: a config class (a llama.LlamaConfig subclass with its
model_type, hf_architecture, from_hf_config/to_hf_config), an HF tensor map, modules that follow
the protocols, and one entry in FAMILIES.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import jax

from jaxalign.models import llama, qwen, tensor_map


class CausalLM(Protocol):
    """What the sampler and the policy roles need of a causal-LM flax module (llama.Llama):
    params {"model": BACKBONE, "lm_head": ...}; `cache` from the family's init_cache."""

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None) -> llama.CausalLMOutput:
        """-> output with logits [B, T, V] fp32, hidden_states [B, T, D], cache."""

    def last_token_logits(self, input_ids, attention_mask=None, positions=None, cache=None):
        """-> (logits of the last column [B, V] fp32, cache)."""


class Backbone(Protocol):
    """What a score model needs of a backbone flax module (llama.LlamaModel)."""

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        """-> (hidden_states [B, T, D] after the final norm, cache or None)."""


@dataclasses.dataclass(frozen=True)
class Family:
    """config_class: the family's config (its model_type / hf_architecture class constants name
    it in config.json); hf_layer_map(cfg): the HF tensors of one decoder layer; causal_lm /
    backbone: flax module classes taking the config; init_cache(cfg, batch, max_length);
    grow_cache(cache, max_length): the cache with more empty slots."""

    config_class: type[llama.LlamaConfig]
    hf_layer_map: Callable[[llama.LlamaConfig], list[tensor_map.HFTensor]]
    causal_lm: Callable[..., CausalLM]
    backbone: Callable[..., Backbone]
    init_cache: Callable[..., Any]
    grow_cache: Callable[..., Any]

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

    def init_params(self, cfg: llama.LlamaConfig, rng: jax.Array) -> dict:
        """Random causal-LM params (plain pytree)."""
        return llama.init_params(cfg, rng)


_DECODER = dict(causal_lm=llama.Llama, backbone=llama.LlamaModel, init_cache=llama.init_cache,
                grow_cache=llama.grow_cache)

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(llama.LlamaConfig, llama.hf_layer_map, **_DECODER),
        Family(qwen.Qwen2Config, qwen.hf_layer_map, **_DECODER),
        Family(qwen.Qwen3Config, qwen.hf_layer_map, **_DECODER),
    )
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def get(model_type: str) -> Family:
    """The family of an HF model_type; a ValueError naming the supported ones otherwise."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"unsupported model_type={model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}")
    return family


def of(cfg: llama.LlamaConfig) -> Family:
    """The family of a config object (by its class's model_type)."""
    family = get(getattr(cfg, "model_type", None))
    if type(cfg) is not family.config_class:
        raise TypeError(f"config of type {type(cfg).__name__} is not the {family.model_type} family's "
                        f"{family.config_class.__name__}")
    return family


def for_hf_config(hf_config: Mapping[str, Any]) -> Family:
    """The family of an HF config.json dict (no model_type: llama)."""
    return get(hf_config.get("model_type", "llama"))


def config_from_hf(hf_config: Mapping[str, Any], **overrides) -> llama.LlamaConfig:
    """The family config of an HF config.json dict, chosen by its model_type; `overrides` set
    runtime fields (dtype, param_dtype, scan_layers, remat_policy) or any other field."""
    return for_hf_config(hf_config).config_class.from_hf_config(hf_config, **overrides)
