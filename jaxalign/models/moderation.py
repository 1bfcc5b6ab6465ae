"""Severity-sensitive, streaming moderation model (PKU-SafeRLHF, Ji et al. 2024, arXiv:2406.15513).

    head = ModerationHead()                                  # 19 categories, 4 severities, threshold 0.5
    model = head.model(cfg)                                  # params {"model": BACKBONE, "unsafe_head",
                                                             #         "category_head", "severity_head"}
    out = model.apply({"params": params}, input_ids, attention_mask=mask)
    out.unsafe_logits      [B, T]        P(the finished answer is unsafe) read at every token
    out.category_logits    [B, T, 19]    multi-label harm categories (sigmoid each)
    out.severity_logits    [B, T, 4]     severity 0..3 (softmax)
    out.end_*                            the same at the last real token (end_index [B])

Any family's backbone (models.backbone) reads (prompt, response) in the prompt template; three
linear heads read every token. Every position is a *prefix* score: trained (objectives/moderation.py)
to predict the label of the finished answer (the Qwen3Guard-Stream recipe), so a caller can stop
a generation at the first response token judged unsafe; the end-token score is the verdict.

Severity is a 4-way softmax, not an ordinal (cumulative-logit) head: PKU-SafeRLHF's levels are
qualitative classes (no harm / minor / moderate / severe, each defined by its own description),
not equally spaced points; the RL constraints want the class probabilities themselves
(P(severity 3) <= 1%, expected severity = sum_k k p_k), which a softmax gives directly and always
consistently, while K-1 independent cumulative logits can cross (P(sev >= 3) > P(sev >= 2)).
The ordering is still used where it matters: the decision rule (evaluate/moderation.py `decide`)
and the severity confusion matrix.

A saved moderation model is an HF-style directory like a score model (score.save_score_model):
config.json = the family's config + the ModerationHead fields (num_categories, num_severities,
category_names, threshold and category_thresholds chosen on validation data, category_threshold,
prompt_template, max_length), architectures "LlamaForModeration" / "Qwen2ForModeration" ...; model.safetensors =
the backbone under its HF names + unsafe_head.{weight [1, D], bias [1]},
category_head.{weight [C, D], bias [C]}, severity_head.{weight [S, D], bias [S]}.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data.pku_saferlhf import HARM_CATEGORIES
from jaxalign.models import families, hf
from jaxalign.models.config import DecoderConfig
from jaxalign.models.layers import Linear
from jaxalign.models.masks import last_true_index

HEAD_NAMES = ("unsafe_head", "category_head", "severity_head")
NUM_SEVERITIES = 4


class ModerationModelError(ValueError):
    """A directory is not a loadable moderation model; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class ModerationHead:
    """Moderation fields stored beside the backbone's config in config.json."""

    num_categories: int = len(HARM_CATEGORIES)
    num_severities: int = NUM_SEVERITIES
    category_names: tuple[str, ...] = HARM_CATEGORIES
    threshold: float = 0.5  # unsafe iff P(unsafe) >= threshold (the stage picks it on validation data)
    category_threshold: float = 0.5  # a category is flagged iff its probability >= this ...
    category_thresholds: tuple[float, ...] = ()  # ... or >= its own threshold (chosen on validation data)
    prompt_template: str = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"  # or "chat"
    max_length: int = 512  # the training length; `jaxalign moderate` cuts inputs to it

    def __post_init__(self):
        object.__setattr__(self, "category_names", tuple(self.category_names))
        if self.num_categories < 1 or len(self.category_names) != self.num_categories:
            raise ValueError(f"category_names has {len(self.category_names)} names, num_categories is "
                             f"{self.num_categories}")
        if self.num_severities < 2:
            raise ValueError(f"num_severities must be >= 2, got {self.num_severities}")
        for name in ("threshold", "category_threshold"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
            object.__setattr__(self, name, value)
        cutoffs = tuple(float(v) for v in self.category_thresholds)
        object.__setattr__(self, "category_thresholds", cutoffs)
        if cutoffs and (len(cutoffs) != self.num_categories or not all(0.0 <= v <= 1.0 for v in cutoffs)):
            raise ValueError(f"category_thresholds must be {self.num_categories} values in [0, 1], got {list(cutoffs)}")
        if self.prompt_template != "chat" and "{input}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{input}} or be 'chat', got {self.prompt_template!r}")

    def model(self, cfg: DecoderConfig) -> "ModerationModel":
        """The ModerationModel module for this head on the backbone `cfg`."""
        return ModerationModel(cfg, self.num_categories, self.num_severities)

    def category_cutoffs(self) -> np.ndarray:
        """The flagging threshold of every category [C]: category_thresholds, else category_threshold."""
        return np.asarray(self.category_thresholds or (self.category_threshold,) * self.num_categories, np.float64)

    def to_config(self) -> dict:
        """The config.json fields of this head."""
        fields = dataclasses.asdict(self)
        fields["category_names"] = list(self.category_names)
        fields["category_thresholds"] = list(self.category_thresholds)
        return fields


@flax.struct.dataclass
class ModerationOutput:
    """Per-token logits (fp32) and the same at end_index [B] (the last real token)."""

    unsafe_logits: jax.Array  # [B, T]
    category_logits: jax.Array  # [B, T, C]
    severity_logits: jax.Array  # [B, T, S]
    end_unsafe_logits: jax.Array  # [B]
    end_category_logits: jax.Array  # [B, C]
    end_severity_logits: jax.Array  # [B, S]
    end_index: jax.Array  # [B] int32


class ModerationModel(nn.Module):
    """The backbone of cfg's family ("model") + three linear heads with bias on every token.

    __call__(input_ids [B, T], attention_mask [B, T] | None, positions [B, T] | None)
      -> ModerationOutput. The end index is the last True of the mask (left or right padding).
    """

    cfg: DecoderConfig
    num_categories: int = len(HARM_CATEGORIES)
    num_severities: int = NUM_SEVERITIES

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None) -> ModerationOutput:
        cfg = self.cfg
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        hidden, _ = families.of(cfg).backbone(cfg, name="model")(input_ids, attention_mask, positions)

        def head(size: int, name: str):
            linear = Linear(cfg, (cfg.hidden_size,), (size,), ("embed", None), True, name=name)
            return linear(hidden).astype(jnp.float32)

        unsafe = head(1, "unsafe_head")[..., 0]
        categories = head(self.num_categories, "category_head")
        severity = head(self.num_severities, "severity_head")
        end_index = last_true_index(attention_mask)

        def take(x):  # x [B, T, ...] -> [B, ...] at end_index
            return jnp.take_along_axis(x, end_index.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]

        return ModerationOutput(
            unsafe_logits=unsafe, category_logits=categories, severity_logits=severity,
            end_unsafe_logits=take(unsafe), end_category_logits=take(categories),
            end_severity_logits=take(severity), end_index=end_index,
        )


def init_heads(cfg: DecoderConfig, rng: jax.Array, head: ModerationHead) -> dict:
    """Fresh head params: kernels ~ N(0, initializer_range) [D, K], biases 0 [K]."""
    sizes = head_sizes(cfg, head)
    out = {}
    for (name, size), key in zip(sizes.items(), jax.random.split(rng, len(sizes))):
        kernel = cfg.initializer_range * jax.random.normal(key, (cfg.hidden_size, size), jnp.float32)
        out[name] = {"kernel": kernel.astype(cfg.weight_dtype), "bias": jnp.zeros((size,), cfg.weight_dtype)}
    return out


def init_params_from_backbone(backbone: Mapping, cfg: DecoderConfig, rng: jax.Array, head: ModerationHead) -> dict:
    """ModerationModel params with `backbone` (a causal LM's or score model's params["model"])
    and fresh heads (init_heads)."""
    return {"model": backbone, **init_heads(cfg, rng, head)}


# ---------------------------------------------------------------------------------------
# Save / load


def head_sizes(cfg: DecoderConfig, head: ModerationHead) -> dict[str, int]:
    return {"unsafe_head": 1, "category_head": head.num_categories, "severity_head": head.num_severities}


def moderation_hf_shapes(cfg: DecoderConfig, head: ModerationHead) -> dict[str, tuple[int, ...]]:
    """Expected HF tensor names -> torch shapes of a moderation model (backbone + heads)."""
    shapes = hf.backbone_hf_shapes(cfg)
    for name, size in head_sizes(cfg, head).items():
        shapes[f"{name}.weight"] = (size, cfg.hidden_size)
        shapes[f"{name}.bias"] = (size,)
    return shapes


def params_to_hf_tensors(cfg: DecoderConfig, params: Mapping, head: ModerationHead, dtype=None) -> dict:
    """ModerationModel params -> HF tensors {name: np array in torch layout}."""
    dtype = cfg.weight_dtype if dtype is None else dtype
    tensors = hf.backbone_to_hf_tensors(cfg, params["model"], dtype=dtype)
    for name in HEAD_NAMES:
        tensors[f"{name}.weight"] = np.asarray(params[name]["kernel"]).T.astype(dtype)
        tensors[f"{name}.bias"] = np.asarray(params[name]["bias"]).astype(dtype)
    return tensors


def params_from_hf_tensors(cfg: DecoderConfig, tensors: Mapping, head: ModerationHead) -> dict:
    """HF tensors -> ModerationModel params (numpy, cfg.param_dtype), with name and shape checks."""
    hf.check_tensors(tensors, moderation_hf_shapes(cfg, head), where="moderation model checkpoint")
    dtype = cfg.weight_dtype
    params = {"model": hf.backbone_from_hf_tensors(cfg, tensors, dtype=dtype)}
    for name in HEAD_NAMES:
        params[name] = {"kernel": np.asarray(tensors[f"{name}.weight"]).T.astype(dtype),
                        "bias": np.asarray(tensors[f"{name}.bias"]).astype(dtype)}
    return params


def save_moderation_model(out_dir: str | os.PathLike, cfg: DecoderConfig, params: Mapping, head: ModerationHead,
                          max_shard_size: int | str | None = None) -> None:
    """Writes config.json (+ head fields) and model.safetensors (tensors in cfg.param_dtype)."""
    tensors = params_to_hf_tensors(cfg, jax.device_get(params), head)
    hf.write_safetensors(out_dir, tensors, max_shard_size=max_shard_size)
    config = cfg.to_hf_config()
    config["architectures"] = [families.of(cfg).architecture.replace("ForCausalLM", "ForModeration")]
    config.update(head.to_config())
    hf.write_config(out_dir, config)


def is_moderation_config(config: Mapping[str, Any]) -> bool:
    """Whether a config.json dict is a moderation model's (has the head fields)."""
    return "num_severities" in config and "category_names" in config


def read_moderation_head(config: Mapping[str, Any], where: str = "config.json", **overrides) -> ModerationHead:
    """The ModerationHead of a moderation config.json dict; `overrides` win."""
    if not is_moderation_config(config):
        raise ModerationModelError(f"{where} has no num_severities/category_names: not a moderation model")
    fields = {f.name: config[f.name] for f in dataclasses.fields(ModerationHead) if f.name in config}
    fields.update(overrides)
    try:
        return ModerationHead(**fields)
    except (TypeError, ValueError) as e:
        raise ModerationModelError(f"{where}: {e}") from e


def load_moderation_model(path: str | os.PathLike, dtype: str = "float32", on_host: bool = False,
                          **cfg_overrides) -> tuple[DecoderConfig, ModerationHead, dict]:
    """(cfg, head, params) from a directory written by save_moderation_model.

    dtype: compute dtype; cfg_overrides go to the family config (param_dtype, scan_layers, ...).
    Params are jax arrays, or numpy when on_host. Raises ModerationModelError / hf.CheckpointError
    naming the problem (missing dir, not a moderation model, mismatched tensors).
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise ModerationModelError(f"moderation model directory {path} does not exist")
    config = hf.read_config(path)
    head = read_moderation_head(config, str(path / hf.CONFIG_NAME))
    cfg = hf.load_config(path, dtype=dtype, **cfg_overrides)
    params = params_from_hf_tensors(cfg, hf.read_safetensors_dir(path), head)
    if not on_host:
        params = jax.tree_util.tree_map(jnp.asarray, params)
    return cfg, head, params


# ---------------------------------------------------------------------------------------
# Moderation as an RL cost signal

COST_SIGNALS = ("unsafe", "expected_severity", "severity3")


def cost_signal(out: ModerationOutput, signal: str = "unsafe") -> jax.Array:
    """A per-token cost [B, T] fp32 from the streaming heads (read at the end token it is the
    sequence cost): "unsafe" = P(unsafe), "expected_severity" = sum_k k P(severity k),
    "severity3" = P(severity 3), "category:<index>" = P(category index)."""
    if signal == "unsafe":
        return jax.nn.sigmoid(out.unsafe_logits)
    probs = jax.nn.softmax(out.severity_logits, axis=-1)
    if signal == "expected_severity":
        return jnp.sum(probs * jnp.arange(probs.shape[-1], dtype=jnp.float32), axis=-1)
    if signal == "severity3":
        return probs[..., -1]
    if signal.startswith("category:") and signal[len("category:"):].isdigit():
        return jax.nn.sigmoid(out.category_logits[..., int(signal[len("category:"):])])
    raise ValueError(f"unknown moderation cost signal {signal!r}; expected one of {COST_SIGNALS} or 'category:<index>'")


def is_moderation_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a moderation model (config.json with the head fields)."""
    file = pathlib.Path(path) / hf.CONFIG_NAME
    if not file.is_file():
        return False
    return is_moderation_config(hf.read_config(path))
