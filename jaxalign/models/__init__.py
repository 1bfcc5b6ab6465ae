"""Models: causal-LM backbones of several families behind one seam, score heads, HF I/O.

    from jaxalign import models
    from jaxalign.models import hf
    cfg, params = hf.from_pretrained(path, dtype="float32")   # Llama, Qwen2/3, Gemma 2/3: by config.json
    out = models.causal_lm(cfg).apply({"params": params}, input_ids, attention_mask=mask)
    out.logits                                                 # [B, T, V] fp32

The family of a config is chosen by its model_type (families.py); these helpers dispatch on it.
Imports are deferred so `jaxalign.models.tokenizer` stays light.
"""

from __future__ import annotations

from typing import Any, Mapping


def causal_lm(cfg):
    """The causal-LM flax module of cfg's family (params {"model": ..., "lm_head": ...})."""
    from jaxalign.models import families

    return families.of(cfg).causal_lm(cfg)


def backbone(cfg, **kwargs):
    """The backbone flax module of cfg's family (embeddings, layers, final norm); kwargs go to
    the module (e.g. name="model")."""
    from jaxalign.models import families

    return families.of(cfg).backbone(cfg, **kwargs)


def init_cache(cfg, batch_size: int, max_length: int, dtype=None):
    """An empty KV cache of cfg's family with room for max_length tokens per row."""
    from jaxalign.models import families

    return families.of(cfg).init_cache(cfg, batch_size, max_length, dtype)


def grow_cache(cfg, cache, max_length: int):
    """cfg's family cache `cache` with room for max_length tokens per row (empty slots appended)."""
    from jaxalign.models import families

    return families.of(cfg).grow_cache(cache, max_length)


def init_params(cfg, rng) -> dict:
    """Random causal-LM params of cfg's family (plain pytree)."""
    from jaxalign.models import families

    return families.of(cfg).init_params(cfg, rng)


def config_from_hf(hf_config: Mapping[str, Any], **overrides):
    """The family config of an HF config.json dict, chosen by its model_type."""
    from jaxalign.models import families

    return families.config_from_hf(hf_config, **overrides)
