"""TrainState: everything a training run carries from one update to the next, as one pytree.

    abstract = abstract_train_state(lambda r: model.init(r, ids)["params"], tx, mesh, rules, extra)
    state = init_train_state(params, tx, rng, abstract, extra)   # params already sharded
    state = state.apply_gradients(grads, tx)                     # inside the jitted step

`abstract_train_state` gives shapes, dtypes and shardings without allocating (restore targets,
AOT compilation, jit in/out shardings via `shardings_of`); `init_train_state` builds the step-0
state directly in those shardings.

Only arrays live in the state (no functions, no optimizer object), so it can be jitted, sharded,
checkpointed with Orbax and restored onto another mesh as is. `extra` holds stage-specific state
that must survive a restart (e.g. the score normalizer's running mean/var, the Lagrange
multiplier); it is an arbitrary pytree of arrays, `{}` when unused.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxalign.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] PRNG key; split per step by the train step
    extra: Any = flax.struct.field(default_factory=dict)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array, extra: Any = None) -> "TrainState":
        """A step-0 state with `tx.init(params)` as optimizer state."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            extra={} if extra is None else extra,
        )

    def apply_gradients(self, grads: Any, tx: optax.GradientTransformation, **changes) -> "TrainState":
        """One optimizer update; `changes` replaces other fields (e.g. extra=..., rng=...)."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)


def abstract_train_state(
    init_params_fn: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules,
    extra: Any = None,
) -> TrainState:
    """The TrainState's shapes, dtypes and shardings, without allocating anything.

    init_params_fn(rng) -> params, possibly boxed with flax logical partitioning
    (e.g. `lambda r: model.init(r, ids)["params"]`); the boxes give the parameter shardings,
    optimizer moments follow their parameters, step/rng/extra are replicated.
    Returns a TrainState of `jax.ShapeDtypeStruct(..., sharding=...)` leaves.
    """
    with mesh_lib.sharding_context(mesh, rules):
        boxed = jax.eval_shape(init_params_fn, mesh_lib.abstract_key())
        param_shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
        abstract = jax.eval_shape(
            lambda r: TrainState.create(nn.meta.unbox(init_params_fn(r)), tx, r, extra), mesh_lib.abstract_key()
        )
    shardings = mesh_lib.state_shardings(abstract, param_shardings, tx, mesh)
    return mesh_lib.with_shardings(abstract, shardings)


def shardings_of(abstract_state: Any) -> Any:
    """The `.sharding` of every ShapeDtypeStruct leaf."""
    return jax.tree.map(lambda x: x.sharding, abstract_state)


def init_train_state(
    params: Any, tx: optax.GradientTransformation, rng: jax.Array, abstract_state: TrainState, extra: Any = None
) -> TrainState:
    """A step-0 TrainState around `params` (already sharded), created in `abstract_state`'s shardings."""
    shardings = shardings_of(abstract_state)
    create = jax.jit(
        lambda p, r: TrainState.create(p, tx, r, extra),
        in_shardings=(shardings.params, shardings.rng),
        out_shardings=shardings,
    )
    return create(params, rng)
