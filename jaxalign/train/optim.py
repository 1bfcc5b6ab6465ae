"""The upstream optimizer: AdamW(0.9, 0.95, eps 1e-8), warmup + cosine/constant, global-norm clip.

    tx = make_optimizer(config.train, num_steps)        # optax.GradientTransformation
    schedule = make_schedule(config.train, num_steps)   # step -> learning rate

Weight decay follows safe-rlhf `get_optimizer_grouped_parameters` (spec §5.11): no decay for
parameters whose HF name contains "bias" or "layernorm.weight" (Llama: `input_layernorm`,
`post_attention_layernorm`); everything else, including the final `model.norm`, is decayed.

Gradient accumulation is not part of the optimizer: the train step of `jaxalign.train.loop`
averages the gradients of `grad_accum_steps` micro-batches and applies one update, so the
optimizer state holds no accumulation buffer and resume is exact at every update.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def make_schedule(train_config, num_steps: int) -> optax.Schedule:
    """Linear warmup for int(warmup_ratio * num_steps) updates, then cosine to 0 or constant."""
    lr = float(train_config.learning_rate)
    warmup = int(float(train_config.warmup_ratio) * num_steps)
    kind = train_config.lr_schedule
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
    raise ValueError(f"config.train.lr_schedule: expected 'cosine' or 'constant', got {kind!r}")


def _path_name(path) -> str:
    parts = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        parts.append(str(key))
    return "/".join(parts).lower()


def weight_decay_mask(params: Any) -> Any:
    """Pytree of bools like `params`: True where weight decay applies (spec §5.11)."""

    def decay(path, _):
        name = _path_name(path)
        return not ("bias" in name or "layernorm" in name)

    return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(train_config, num_steps: int) -> optax.GradientTransformation:
    """AdamW with the upstream betas/eps, the decay mask, the schedule and global-norm clipping."""
    transforms = []
    if float(train_config.max_grad_norm) > 0:
        transforms.append(optax.clip_by_global_norm(float(train_config.max_grad_norm)))
    transforms.append(
        optax.adamw(
            learning_rate=make_schedule(train_config, num_steps),
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=float(train_config.weight_decay),
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*transforms)
