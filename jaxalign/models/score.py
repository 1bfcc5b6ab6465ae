"""Score models (reward, cost, critic): any family's backbone plus a linear score head
(safe-rlhf's safe_rlhf/models/score_model/__init__.py).

    model = ScoreModel(cfg)                       # params {"model": BACKBONE, "score_head": {...}}
    out = model.apply({"params": params}, input_ids, attention_mask=mask)
    out.end_scores                                # [B, K] fp32 score at the last real token
    head, params, stats = ..., load_score_model(path)
    save_score_model(out_dir, cfg, params, head, stats)

Normalizer statistics are a small pytree {mean [K], var [K], count []} updated by pure
functions, so they live in a train state and travel through jit. The model itself never
normalizes: callers apply `normalize(x, stats, score_type)` when they want it.

A saved score model is an HF-style directory: config.json (the family's config plus score_type,
score_dim, score_bias, normalizer_type, momentum, do_normalize, mean, var, count, like
upstream's LlamaForScore config; architectures "LlamaForScore", "Qwen2ForScore", ...) and
model.safetensors with the backbone under its HF names (model.layers.N...) plus
score_head.weight [K, D] and score_head.bias [K].
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

from jaxalign.models import families, hf
from jaxalign.models.config import DecoderConfig
from jaxalign.models.layers import Linear
from jaxalign.models.masks import last_true_index
# Shared numerics (one implementation of the end-index rule for every caller).

SCORE_TYPES = ("reward", "cost", "critic")
NORMALIZER_TYPES = (None, "RunningMeanStd", "ExponentialMovingAverage")
# score_type -> normalize function: the cost keeps its sign (sign carries safety).
NORMALIZE_FUNCTIONS = {"reward": "affine", "cost": "scale", "critic": "identity"}


# ---------------------------------------------------------------------------------------
# Normalizers


def check_normalizer_type(normalizer_type: str | None) -> str | None:
    """Map "none"/"" to None and reject unknown types."""
    if normalizer_type in ("none", "None", ""):
        normalizer_type = None
    if normalizer_type not in NORMALIZER_TYPES:
        raise ValueError(
            f"unknown normalizer_type {normalizer_type!r}; expected one of {NORMALIZER_TYPES}"
        )
    return normalizer_type


def init_normalizer(score_dim: int = 1) -> dict[str, jax.Array]:
    """Initial statistics: mean 0, var 1, count 0. -> {mean [K], var [K], count [] int32}."""
    return {
        "mean": jnp.zeros((score_dim,), jnp.float32),
        "var": jnp.ones((score_dim,), jnp.float32),
        "count": jnp.zeros((), jnp.int32),
    }


def update_normalizer(
    stats: dict[str, jax.Array],
    data: jax.Array,
    normalizer_type: str | None,
    momentum: float = 0.9,
) -> dict[str, jax.Array]:
    """Fold a batch of end scores into the statistics. data: [N, K] -> new stats.

    None: only counts. RunningMeanStd: Chan's batch merge. ExponentialMovingAverage:
    mean/var moved towards the batch mean/var by (1 - momentum). Batch var is unbiased.
    """
    normalizer_type = check_normalizer_type(normalizer_type)
    data = data.astype(jnp.float32)
    batch_count = data.shape[0]
    count = stats["count"] + batch_count
    if normalizer_type is None:
        return {"mean": stats["mean"], "var": stats["var"], "count": count}
    batch_mean = jnp.mean(data, axis=0)
    batch_var = jnp.var(data, axis=0, ddof=1)
    if normalizer_type == "ExponentialMovingAverage":
        mean = momentum * stats["mean"] + (1.0 - momentum) * batch_mean
        var = momentum * stats["var"] + (1.0 - momentum) * batch_var
        return {"mean": mean, "var": var, "count": count}
    old_count = stats["count"].astype(jnp.float32)
    total = count.astype(jnp.float32)
    delta = batch_mean - stats["mean"]
    mean = stats["mean"] + delta * batch_count / total
    m2 = stats["var"] * old_count + batch_var * batch_count
    m2 = m2 + jnp.square(delta) * old_count * batch_count / total
    return {"mean": mean, "var": m2 / total, "count": count}


def normalize(
    x: jax.Array, stats: dict[str, jax.Array], score_type: str, epsilon: float = 1e-8
) -> jax.Array:
    """Normalize scores [..., K] by score type: reward (x-μ)/(σ+ε), cost x/(σ+ε), critic x."""
    if score_type not in SCORE_TYPES:
        raise ValueError(f"unknown score_type {score_type!r}; expected one of {SCORE_TYPES}")
    function = NORMALIZE_FUNCTIONS[score_type]
    if function == "identity":
        return x
    mean = jax.lax.stop_gradient(stats["mean"])
    std = jnp.sqrt(jax.lax.stop_gradient(stats["var"]))
    if function == "affine":
        return (x - mean) / (std + epsilon)
    return x / (std + epsilon)


# ---------------------------------------------------------------------------------------
# Model


@flax.struct.dataclass
class ScoreOutput:
    """scores [B, T, K] fp32; end_scores [B, K] fp32 at end_index [B] (last real token);
    hidden_states [B, T, D] after the final norm; end_hidden_states [B, D]."""

    scores: jax.Array
    end_scores: jax.Array
    end_index: jax.Array
    hidden_states: jax.Array
    end_hidden_states: jax.Array


class ScoreModel(nn.Module):
    """The backbone of cfg's family ("model") + linear score head ("score_head", kernel [D, K],
    bias [K]).

    __call__(input_ids [B, T], attention_mask [B, T] | None, positions [B, T] | None)
      -> ScoreOutput. The end index is the last True of the mask, so left and right padding
    both work. The head runs in the compute dtype; its output is cast to fp32.
    """

    cfg: DecoderConfig
    score_dim: int = 1
    score_bias: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None) -> ScoreOutput:
        cfg = self.cfg
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        hidden, _ = families.of(cfg).backbone(cfg, name="model")(input_ids, attention_mask, positions)
        head = Linear(
            cfg, (cfg.hidden_size,), (self.score_dim,), ("embed", None), self.score_bias,
            name="score_head",
        )
        scores = head(hidden).astype(jnp.float32)
        end_index = last_true_index(attention_mask)
        take = lambda x: jnp.take_along_axis(x, end_index[:, None, None], axis=1)[:, 0]  # noqa: E731
        return ScoreOutput(
            scores=scores,
            end_scores=take(scores),
            end_index=end_index,
            hidden_states=hidden,
            end_hidden_states=take(hidden),
        )


def init_score_params(cfg: DecoderConfig, rng: jax.Array, score_dim: int = 1, score_bias: bool = True) -> dict:
    """Random ScoreModel parameters as a plain (unboxed) pytree."""
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = jax.jit(ScoreModel(cfg, score_dim, score_bias).init)(rng, ids)
    return nn.meta.unbox(variables["params"])


# ---------------------------------------------------------------------------------------
# Save / load


class ScoreModelError(ValueError):
    """A directory is not a loadable score model; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class ScoreHead:
    """Score-model fields stored beside the backbone's config in config.json."""

    score_type: str = "reward"
    score_dim: int = 1
    score_bias: bool = True
    normalizer_type: str | None = None
    momentum: float = 0.9
    do_normalize: bool = False

    def __post_init__(self):
        if self.score_type not in SCORE_TYPES:
            raise ValueError(f"unknown score_type {self.score_type!r}; expected one of {SCORE_TYPES}")
        object.__setattr__(self, "normalizer_type", check_normalizer_type(self.normalizer_type))
        if self.score_dim < 1:
            raise ValueError(f"score_dim must be >= 1, got {self.score_dim}")

    def model(self, cfg: DecoderConfig) -> ScoreModel:
        """The ScoreModel module for this head on the backbone `cfg`."""
        return ScoreModel(cfg, self.score_dim, self.score_bias)


def score_head_hf_shapes(cfg: DecoderConfig, head: ScoreHead) -> dict[str, tuple[int, ...]]:
    """Expected HF tensor names -> torch shapes of a score model (backbone + head)."""
    shapes = hf.backbone_hf_shapes(cfg)
    shapes["score_head.weight"] = (head.score_dim, cfg.hidden_size)
    if head.score_bias:
        shapes["score_head.bias"] = (head.score_dim,)
    return shapes


def score_params_to_hf_tensors(
    cfg: DecoderConfig, params: Mapping, head: ScoreHead, dtype=None
) -> dict[str, np.ndarray]:
    """ScoreModel params -> HF tensors {name: np array in torch layout}."""
    dtype = cfg.weight_dtype if dtype is None else dtype
    tensors = hf.backbone_to_hf_tensors(cfg, params["model"], dtype=dtype)
    tensors["score_head.weight"] = np.asarray(params["score_head"]["kernel"]).T.astype(dtype)
    if head.score_bias:
        tensors["score_head.bias"] = np.asarray(params["score_head"]["bias"]).astype(dtype)
    return tensors


def score_params_from_hf_tensors(cfg: DecoderConfig, tensors: Mapping, head: ScoreHead) -> dict:
    """HF tensors -> ScoreModel params (numpy, cfg.param_dtype), with name and shape checks."""
    hf.check_tensors(tensors, score_head_hf_shapes(cfg, head), where="score model checkpoint")
    dtype = cfg.weight_dtype
    params = {
        "model": hf.backbone_from_hf_tensors(cfg, tensors, dtype=dtype),
        "score_head": {"kernel": np.asarray(tensors["score_head.weight"]).T.astype(dtype)},
    }
    if head.score_bias:
        params["score_head"]["bias"] = np.asarray(tensors["score_head.bias"]).astype(dtype)
    return params


def save_score_model(
    out_dir: str | os.PathLike,
    cfg: DecoderConfig,
    params: Mapping,
    head: ScoreHead,
    stats: Mapping[str, Any] | None = None,
    max_shard_size: int | str | None = None,
) -> None:
    """Writes config.json + model.safetensors of a score model (tensors in cfg.param_dtype).

    stats: normalizer statistics {mean, var, count} (default: the initial ones).
    """
    stats = jax.device_get(init_normalizer(head.score_dim) if stats is None else stats)
    tensors = score_params_to_hf_tensors(cfg, jax.device_get(params), head)
    hf.write_safetensors(out_dir, tensors, max_shard_size=max_shard_size)
    config = cfg.to_hf_config()
    config["architectures"] = [families.of(cfg).score_architecture]
    config.update(dataclasses.asdict(head))
    config["mean"] = np.asarray(stats["mean"], np.float64).tolist()
    config["var"] = np.asarray(stats["var"], np.float64).tolist()
    config["count"] = int(stats["count"])
    hf.write_config(out_dir, config)


def read_score_head(config: Mapping[str, Any], where: str = "config.json", **overrides) -> ScoreHead:
    """The ScoreHead of a score-model config.json dict; `overrides` (e.g. score_type) win."""
    if "score_dim" not in config and "score_dim" not in overrides:
        raise ScoreModelError(
            f"{where} has no score_dim: not a score model (a causal-LM dir initialises a score "
            "model through loading.load_backbone_with_head / init_params_from_backbone instead)"
        )
    fields = {f.name: config[f.name] for f in dataclasses.fields(ScoreHead) if f.name in config}
    if fields.get("momentum") is None:
        fields.pop("momentum", None)  # upstream writes null when the normalizer is not an EMA
    fields.update(overrides)
    try:
        return ScoreHead(**fields)
    except (TypeError, ValueError) as e:
        raise ScoreModelError(f"{where}: {e}") from e


def read_normalizer_stats(
    config: Mapping[str, Any], score_dim: int, where: str = "config.json"
) -> dict[str, jax.Array]:
    """Normalizer statistics stored in a score-model config (initial stats when absent)."""
    stats = init_normalizer(score_dim)
    for key in ("mean", "var"):
        if config.get(key) is not None:
            value = jnp.asarray(config[key], jnp.float32).reshape(-1)
            if value.shape != (score_dim,):
                raise ScoreModelError(f"{where}: {key} has {value.shape[0]} entries, score_dim is {score_dim}")
            stats[key] = value
    if config.get("count") is not None:
        stats["count"] = jnp.asarray(int(config["count"]), jnp.int32)
    return stats


def load_score_model(
    path: str | os.PathLike,
    dtype: str = "float32",
    score_type: str | None = None,
    on_host: bool = False,
    **cfg_overrides,
) -> tuple[DecoderConfig, ScoreHead, dict, dict]:
    """(cfg, head, params, stats) from a score-model dir written by save_score_model.

    dtype: compute dtype; score_type overrides the stored one (e.g. "critic" for a critic
    initialised from a reward model); cfg_overrides go to the family config (param_dtype,
    scan_layers, ...). Params are jax arrays, or numpy when on_host (to place them sharded
    with jaxalign.parallel.mesh.put_sharded). Raises ScoreModelError / hf.CheckpointError
    naming the problem for a missing dir, a plain causal-LM dir or mismatched tensors.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise ScoreModelError(f"score model directory {path} does not exist")
    where = str(path / hf.CONFIG_NAME)
    config = hf.read_config(path)
    overrides = {} if score_type is None else {"score_type": score_type}
    head = read_score_head(config, where, **overrides)
    stats = read_normalizer_stats(config, head.score_dim, where)
    cfg = hf.load_config(path, dtype=dtype, **cfg_overrides)
    tensors = hf.read_safetensors_dir(path)
    params = score_params_from_hf_tensors(cfg, tensors, head)
    if not on_host:
        params = jax.tree_util.tree_map(jnp.asarray, params)
    return cfg, head, params, stats


def init_params_from_backbone(
    backbone: Mapping, cfg: DecoderConfig, rng: jax.Array, score_dim: int = 1, score_bias: bool = True
) -> dict:
    """ScoreModel params with `backbone` (a policy's or score model's params["model"]) and a
    fresh score head (kernel ~ N(0, initializer_range), bias 0)."""
    kernel = cfg.initializer_range * jax.random.normal(rng, (cfg.hidden_size, score_dim), jnp.float32)
    head = {"kernel": kernel.astype(cfg.weight_dtype)}
    if score_bias:
        head["bias"] = jnp.zeros((score_dim,), cfg.weight_dtype)
    return {"model": backbone, "score_head": head}

