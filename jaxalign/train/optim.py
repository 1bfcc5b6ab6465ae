"""The upstream optimizer: AdamW(0.9, 0.95, eps 1e-8), warmup + cosine/constant, global-norm clip.

    settings = OptimizerSettings(learning_rate=2e-5, lr_schedule="cosine", warmup_ratio=0.03)
    tx = make_optimizer(settings, num_steps)            # optax.GradientTransformation
    schedule = make_schedule(settings, num_steps)       # step -> learning rate

Weight decay follows safe-rlhf `get_optimizer_grouped_parameters` (safe_rlhf/utils.py): no decay for
parameters whose HF name contains "bias" or "layernorm.weight" (Llama: `input_layernorm`,
`post_attention_layernorm`); everything else, including the final `model.norm`, is decayed.

Gradient accumulation is not part of the optimizer: the train step of `jaxalign.train.loop`
averages the gradients of `grad_accum_steps` micro-batches and applies one update, so the
optimizer state holds no accumulation buffer and resume is exact at every update.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW settings of one trained model (config.train for the policy, config.rl.critic for critics)."""

    learning_rate: float
    lr_schedule: str = "cosine"  # cosine (to 0 after warmup) | constant (after warmup)
    warmup_ratio: float = 0.0  # warmup updates = int(warmup_ratio * num_steps)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    where: str = "config.train"  # the config group, for error messages

    def __post_init__(self):
        for name in ("learning_rate", "warmup_ratio", "weight_decay", "max_grad_norm"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"{self.where}.{name} must be finite, got {value}")
        if self.learning_rate < 0:
            raise ValueError(f"{self.where}.learning_rate must be >= 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"{self.where}.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"{self.where}.lr_schedule: expected one of {SCHEDULES}, got {self.lr_schedule!r}")

    @classmethod
    def from_group(cls, group, where: str) -> "OptimizerSettings":
        """From a config group with the five optimizer fields (a ConfigDict or any object)."""
        names = ("learning_rate", "lr_schedule", "warmup_ratio", "weight_decay", "max_grad_norm")
        return cls(**{name: getattr(group, name) for name in names}, where=where)


def make_schedule(settings: OptimizerSettings, num_steps: int) -> optax.Schedule:
    """Linear warmup for int(warmup_ratio * num_steps) updates, then cosine to 0 or constant."""
    lr = float(settings.learning_rate)
    warmup = int(float(settings.warmup_ratio) * num_steps)
    kind = settings.lr_schedule
    if kind == "cosine":
        # HF get_cosine_schedule_with_warmup: lr * step/warmup, then 0.5*(1+cos(pi*progress)).
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1), end_value=0.0
        )
    if kind == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], boundaries=[warmup]
        )
    raise ValueError(f"lr_schedule: expected 'cosine' or 'constant', got {kind!r}")


def _path_name(path) -> str:
    parts = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        parts.append(str(key))
    return "/".join(parts).lower()


def weight_decay_mask(params: Any) -> Any:
    """Pytree of bools like `params`: True where weight decay applies (see the module docstring)."""

    def decay(path, _):
        name = _path_name(path)
        return not ("bias" in name or "layernorm" in name)

    return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(settings: OptimizerSettings, num_steps: int) -> optax.GradientTransformation:
    """AdamW with the upstream betas/eps, the decay mask, the schedule and global-norm clipping."""
    transforms = []
    if float(settings.max_grad_norm) > 0:
        transforms.append(optax.clip_by_global_norm(float(settings.max_grad_norm)))
    transforms.append(
        optax.adamw(
            learning_rate=make_schedule(settings, num_steps),
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=float(settings.weight_decay),
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*transforms)
