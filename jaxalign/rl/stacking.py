"""Roles of one architecture as one batched computation over stacked parameters.

    groups = stack_groups(fns, params, inputs)      # ((role, ...), ...): roles that can share a pass
    outputs = score_pass(fns, params, inputs)       # {role: per-token scores [B,L]}

Two roles stack when their functions share a `stack_key` (a ScoreModelFn's module, else the
function object itself), their params have the same structure, shapes and dtypes, and they read
the same (ids, mask) arrays. A stacked group runs `raw` vmapped over params stacked on a new
leading axis, then each role's own `finish` (its normalization). Anything else (a moderation
role, a role with its own tokenizer, a LoRA actor beside a full reference) runs alone, as before.
The numbers equal the per-role passes up to fp32 reassociation in the batched matmuls.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def parts(fn: Callable) -> tuple[Any, Callable, Callable]:
    """(stack key, shared pass, the role's finish) of a role function."""
    if hasattr(fn, "stack_key"):
        return fn.stack_key, fn.raw, fn.finish
    return fn, fn, lambda x: x


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((x.shape, jnp.dtype(x.dtype)) for x in leaves)


def stack_groups(fns: dict[str, Callable], params: dict[str, Any], inputs: dict[str, tuple] | None = None,
                 stack: bool = True) -> list[tuple[str, ...]]:
    """Roles grouped by what can run as one pass, in first-seen order. fns {role: fn}, params
    {role: pytree}, inputs {role: (ids, mask)} (None: all the same); stack=False: every role alone."""
    groups: dict[Any, list[str]] = {}
    for role, fn in fns.items():
        if not stack:
            groups[role] = [role]
            continue
        ids_mask = tuple(id(x) for x in inputs[role]) if inputs else ()
        key = (parts(fn)[0], _signature(params[role]), ids_mask)
        groups.setdefault(key, []).append(role)
    return [tuple(group) for group in groups.values()]


def stack_trees(trees: list[Any]) -> Any:
    """Pytrees of equal shapes -> one pytree with a new leading axis [N, ...]."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_trees(tree: Any, n: int) -> list[Any]:
    """Inverse of `stack_trees`."""
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def stacked_raw(fn: Callable, stacked_params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The shared pass of `fn` vmapped over stacked params [N, ...]. -> [N, ...its output]."""
    raw = parts(fn)[1]
    return jax.vmap(raw, in_axes=(0, None, None))(stacked_params, input_ids, attention_mask)


def score_pass(fns: dict[str, Callable], params: dict[str, Any], inputs: dict[str, tuple],
               stack: bool = True) -> dict[str, jax.Array]:
    """Every role's per-token scores, stacked where possible. fns {role: ScoreFn}, params {role:
    pytree}, inputs {role: (ids, mask) [B,L]}. -> {role: [B,L]}."""
    out = {}
    for group in stack_groups(fns, params, inputs, stack):
        if len(group) == 1:
            (role,) = group
            out[role] = fns[role](params[role], *inputs[role])
            continue
        raw = stacked_raw(fns[group[0]], stack_trees([params[role] for role in group]), *inputs[group[0]])
        for index, role in enumerate(group):
            out[role] = parts(fns[role])[2](raw[index])
    return out
