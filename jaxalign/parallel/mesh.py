"""Device mesh, logical-axis sharding rules and sharded initialisation, all from `config.mesh`.

    maybe_initialize_distributed(config.mesh)          # multi-host: same command on every host
    mesh = make_mesh(config.mesh)                      # axes ("data", "fsdp", "tensor")
    rules = axis_rules(config.mesh)                    # (("embed", "fsdp"), ("mlp", "tensor"), ...)
    params, shardings = init_sharded(init_fn, rng, mesh, rules)

The model annotates parameters with logical names (flax `nn.with_logical_partitioning`) and
activations with `nn.with_logical_constraint`; `rules` maps those names onto mesh axes, so the
same model code runs replicated on one CPU or FSDP x tensor-parallel on a pod. Tracing a model
needs the mesh and the rules in scope: wrap it in `with sharding_context(mesh, rules):`.

Parameters are created inside `jax.jit(..., out_shardings=...)` (`init_sharded`) or put on the
devices shard by shard (`put_sharded`), so no device ever holds a full copy of a sharded array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension of every input is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes (configs/base.py's config.mesh.axis_rules): FSDP over "fsdp", tensor
# parallelism over "tensor", the batch over both data-parallel axes.
DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
)

_initialized = False


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """config.mesh as typed settings (the fields make_mesh / axis_rules / distributed init read)."""

    data: int = 1
    fsdp: int = -1  # all devices left over
    tensor: int = 1
    axis_rules: tuple = DEFAULT_AXIS_RULES
    distributed: bool = False
    coordinator_address: str = ""
    num_processes: int = -1
    process_id: int = -1


def maybe_initialize_distributed(mesh_config) -> None:
    """Calls `jax.distributed.initialize` once when `mesh_config.distributed` is set.

    Empty/-1 coordinator fields are left for JAX to auto-detect (TPU pods, SLURM, ...).
    Must run before anything touches the devices.
    """
    global _initialized
    if not mesh_config.distributed or _initialized:
        return
    kwargs = {}
    if mesh_config.coordinator_address:
        kwargs["coordinator_address"] = mesh_config.coordinator_address
    if mesh_config.num_processes > 0:
        kwargs["num_processes"] = mesh_config.num_processes
    if mesh_config.process_id >= 0:
        kwargs["process_id"] = mesh_config.process_id
    jax.distributed.initialize(**kwargs)
    _initialized = True
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def mesh_and_rules(settings: MeshSettings) -> tuple[jax.sharding.Mesh, tuple]:
    """(mesh, axis rules) of typed settings, after `jax.distributed` initialisation when they ask
    for it; the mesh is logged."""
    maybe_initialize_distributed(settings)
    mesh = make_mesh(settings)
    logging.info("mesh: %s", describe(mesh))
    return mesh, axis_rules(settings)


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
    """Resolves -1 in (data, fsdp, tensor) and checks the product equals `num_devices`."""
    sizes = {axis: int(getattr(mesh_config, axis)) for axis in MESH_AXES}
    unknown = [axis for axis, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {sizes}")
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"config.mesh.{axis}: expected a positive size or -1, got {size}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"config.mesh: {num_devices} devices are not divisible by the fixed axes {sizes} (product {known})"
            )
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"config.mesh: data*fsdp*tensor = {math.prod(sizes.values())} ({sizes}) but there are "
            f"{num_devices} devices; set the sizes to multiply to {num_devices} or use -1 for one axis"
        )
    return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices, all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    # Auto axes: GSPMD propagates shardings from the annotated parameters and constraints.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def axis_rules(mesh_config) -> tuple[tuple[str, Any], ...]:
    """The logical -> mesh axis table of `config.mesh.axis_rules` as flax expects it."""
    rules = []
    for entry in mesh_config.axis_rules:
        if len(entry) != 2:
            raise ValueError(f"config.mesh.axis_rules: expected (logical_name, mesh_axes) pairs, got {entry!r}")
        name, target = entry
        if isinstance(target, list):
            target = tuple(target)
        targets = target if isinstance(target, tuple) else (target,)
        for axis in targets:
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"config.mesh.axis_rules[{name!r}]: unknown mesh axis {axis!r}; valid: {MESH_AXES}")
        rules.append((name, target))
    return tuple(rules)


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, rules) -> Iterator[None]:
    """`jax.set_mesh(mesh)` + flax logical axis rules: needed while tracing sharded model code."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of an input array [B, ...]: B over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _divisible(sharding: NamedSharding, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> NamedSharding:
    """Drops mesh axes from dims they do not divide (e.g. vocab 32001 over tensor=4): that dim is replicated."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    changed = False
    for dim, axes in enumerate(spec[: len(shape)]):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        if shape[dim] % math.prod(mesh.shape[name] for name in names):
            logging.warning("dim %d of size %d is not divisible by mesh axes %s: replicated", dim, shape[dim], names)
            spec[dim], changed = None, True
    return NamedSharding(mesh, P(*spec[: len(shape)])) if changed else sharding


def logical_shardings(boxed_tree: Any, mesh: jax.sharding.Mesh, rules) -> Any:
    """NamedShardings for a (possibly abstract) tree of flax `Partitioned` boxes.

    Unannotated leaves are replicated, and so is any dim that its mesh axes do not divide.
    The result has the structure of the unboxed tree.
    """
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    values = jax.tree.map(lambda x: x.value if is_box(x) else x, boxed_tree, is_leaf=is_box)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)
    return jax.tree.map(lambda s, v: _divisible(s, tuple(v.shape), mesh), shardings, values)


def abstract_key() -> jax.ShapeDtypeStruct:
    """The shape and dtype of a `jax.random.PRNGKey`, for `jax.eval_shape` of an init. A concrete key
    would run eagerly, which fails while a mesh of compile-only devices (jaxalign.plan) is current."""
    return jax.eval_shape(lambda: jax.random.PRNGKey(0))


def init_sharded(
    init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: jax.sharding.Mesh, rules
) -> tuple[Any, Any]:
    """Runs `init_fn(rng) -> boxed params` under jit so every array is born in its sharding.

    Returns (unboxed params, their NamedShardings).
    """
    with sharding_context(mesh, rules):
        abstract = jax.eval_shape(init_fn, rng)
        shardings = logical_shardings(abstract, mesh, rules)
        params = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return params, shardings


def put_sharded(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Host array -> global jax.Array; each device receives only its own slice.

    Multi-host: every process passes the same (e.g. memory-mapped) array and only its
    addressable slices are read.
    """
    return jax.make_array_from_callback(array.shape, sharding, lambda index: np.asarray(array[index]))


def global_rows(x: jax.Array) -> np.ndarray:
    """Every row of a batch-sharded array [B, ...], the same numpy array on every process
    (process_allgather across hosts: device_get alone fails on rows that other hosts hold)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def with_shardings(tree: Any, shardings: Any) -> Any:
    """Abstract twin of `tree`: ShapeDtypeStructs carrying `shardings` (restore/AOT targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def state_shardings(abstract_state: Any, param_shardings: Any, tx: optax.GradientTransformation, mesh) -> Any:
    """Shardings of a `TrainState`: optimizer moments follow their parameters, the rest replicated."""
    rep = replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_state.opt_state,
        param_shardings,
        transform_non_params=lambda _: rep,
    )
    return abstract_state.replace(
        step=rep,
        params=param_shardings,
        opt_state=opt_shardings,
        rng=rep,
        extra=jax.tree.map(lambda _: rep, abstract_state.extra),
    )


def describe(mesh: jax.sharding.Mesh) -> str:
    """'data=1 fsdp=4 tensor=2 (8 devices, 1 process)'."""
    sizes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    return f"{sizes} ({mesh.devices.size} devices, {jax.process_count()} process{'es' if jax.process_count() > 1 else ''})"
