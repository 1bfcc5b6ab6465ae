"""The steps of a supervised stage (SFT, reward / cost, DPO family, moderation) from abstract inputs.

    batch = batch_spec("sft", batch_size, max_length, mesh)
    train = train_step(loss_fn, tx, grad_accum, abstract_state, batch, frozen, passes=...)
    evaluate = eval_step(jax.jit(metrics_fn), (abstract_state.params, batch, abstract_state.extra), ...)

The train step is the update `loop.train` runs (`loop.jit_train_step`: the state donated, the frozen
models passed along); the eval step is the jitted function the stage evaluates with. Their
arguments are ShapeDtypeStructs carrying NamedShardings, so compiling them allocates nothing.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxalign.parallel import mesh as mesh_lib
from jaxalign.plan import steps as steps_lib
from jaxalign.train import loop

# data/pipeline.py's batch contract: key -> (dtype, per-row shape; "L" = the sequence length)
_SEQUENCE = {"input_ids": jnp.int32, "attention_mask": jnp.bool_}
NUM_CATEGORIES = 19


def batch_keys(kind: str) -> dict[str, tuple[Any, tuple]]:
    """{key: (dtype, per-row shape)} of a data/pipeline.py batch of `kind` ("L": the sequence)."""
    if kind in ("sft", "qa", "prompt"):
        keys = {name: (dtype, ("L",)) for name, dtype in _SEQUENCE.items()}
        if kind == "sft":
            keys["loss_mask"] = (jnp.bool_, ("L",))
        if kind == "qa":
            keys.update(response_mask=(jnp.bool_, ("L",)), is_safe=(jnp.bool_, ()),
                        categories=(jnp.bool_, (NUM_CATEGORIES,)), severity=(jnp.int32, ()))
        return keys
    sides = {"preference": ("better", "worse"), "safety_preference": ("safer", "unsafer")}.get(kind)
    if sides is None:
        raise ValueError(f"unknown batch kind {kind!r}")
    keys = {f"{side}_{name}": (dtype, ("L",)) for side in sides
            for name, dtype in {**_SEQUENCE, "response_mask": jnp.bool_}.items()}
    if kind == "safety_preference":
        keys.update({f"{side}_sign": (jnp.int32, ()) for side in sides})
    return keys


def batch_spec(kind: str, batch_size: int, length: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """An abstract batch of `kind`: every array [batch_size, ...] sharded over the batch axes."""
    out = {}
    for key, (dtype, row) in batch_keys(kind).items():
        shape = (batch_size, *(length if d == "L" else d for d in row))
        out[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.batch_sharding(mesh, len(shape)))
    return out


def train_step(loss_fn: Callable, tx, grad_accum_steps: int, abstract_state: Any, batch: dict, frozen: Any = None,
               *, tokens: int, passes=(), note: str = "") -> steps_lib.Step:
    """The stage's update (loop.jit_train_step) on `grad_accum_steps` micro-batches like `batch`."""
    frozen_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
    fn = loop.jit_train_step(loss_fn, tx, grad_accum_steps, abstract_state, None, frozen_shardings)
    return steps_lib.Step("train", fn, (abstract_state, [batch] * grad_accum_steps, frozen), tokens=tokens,
                          passes=tuple(passes), note=note)


def eval_step(fn: Callable, args: tuple, *, tokens: int, passes=(), note: str = "") -> steps_lib.Step:
    """The stage's jitted evaluation function `fn` on abstract `args`."""
    return steps_lib.Step("eval", fn, args, tokens=tokens, passes=tuple(passes), note=note)
