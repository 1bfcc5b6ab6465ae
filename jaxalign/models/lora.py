"""LoRA adapters on the projection kernels of any family's decoder, through qwix.

    settings = LoraSettings(rank=8, alpha=16.0)                  # rank 0 = off
    module = wrap(models.causal_lm(cfg), settings)               # same calls; params = base + adapters
    adapters, shardings = init_adapters(models.causal_lm(cfg), settings, rng, mesh, rules)
    out = module.apply({"params": combine(base, adapters, cfg.compute_dtype)}, ids, attention_mask=mask)
    merged = merge(base, adapters, settings)                     # plain params: W + alpha/r * A @ B

qwix (`qwix.LoraProvider`) intercepts the matmul of each target `Linear` and adds
`x @ A @ B * alpha / rank`; A [*lead, n_in, r] (qwix's he-uniform init) and B [*lead, r, n_out]
(zeros, so a fresh adapter leaves the model unchanged) live beside the kernel as
"kernel_lora_a" / "kernel_lora_b" (lead = [L] for scanned layers; n_in, n_out: the kernel's
input / output dims flattened, e.g. q_proj [D, H, Dh] -> A [D, r], B [r, H*Dh]).

The adapters are a tree of their own (`split` / `combine`), so the trained state holds only them
(fp32 master weights, cast to the compute dtype at apply) while the frozen base is shared (RL:
the actor's base is the reference; with config.lora.critics a critic is adapters + its own score
head on the frozen reward / cost model). Four things of qwix 0.1.8 this module works around:
  * the adapters take the base kernel's dtype and their delta is added without a cast
    (qwix/_src/providers/lora.py, _get_or_create_lora_params: lora_dtype; LoraProvider.dot_general
    `res + delta * scale`): fp32 adapters under a bf16 compute dtype change the scanned layer's carry
    dtype (a TypeError). Adapters are initialised under a compute dtype equal to their own and cast
    to the compute dtype in `combine`.
  * B's logical axes are derived from the 2-D view of the kernel but applied to its N-D axis names
    (lora.py, _create_lora_layer_shapes + update_boxed(transpose=...)): o_proj's B [r, D] gets
    "head_dim" instead of "embed". `init_adapters` re-derives A's and B's names from the kernel's.
  * under logical axis rules, creating an adapter unboxes it with the kernel's N-D names
    (flax_util.update_boxed: `boxed.unbox()`), a rank error; adapters are created without rules.
  * the kernel is found by following the tracer back from the matmul operand
    (qwix/_src/utils/flax_util.py, find_param: approach 1); un-jitted with unscanned layers the
    reshaped multi-dim kernels (q/k/v/o) are not found and silently get no adapter (approach 2 is a
    shape match). Every jaxalign caller runs the model under jit; the tests check it there.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import traverse_util

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUFFIXES = ("kernel_lora_a", "kernel_lora_b")
_MODULE_GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """config.lora: rank 0 = off (every parameter trained); alpha / rank scales A @ B; targets:
    the projections that get adapters. No dropout (the models have none)."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS
    where: str = dataclasses.field(default="config.lora", compare=False)  # for error messages

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if int(self.rank) < 0:
            raise ValueError(f"{self.where}.rank must be >= 0 (0 = off), got {self.rank}")
        if not (math.isfinite(float(self.alpha)) and float(self.alpha) > 0):
            raise ValueError(f"{self.where}.alpha must be a positive number, got {self.alpha}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or (self.rank and not self.targets):
            raise ValueError(f"{self.where}.targets: expected a non-empty subset of {TARGETS}, got {self.targets}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)


@flax.struct.dataclass
class Adapted:
    """A LoRA model's params as two trees: the frozen base and the trained adapters."""

    base: Any
    adapters: Any


def _provider(settings: LoraSettings) -> qwix.LoraProvider:
    pattern = f"(.*/)?({'|'.join(re.escape(t) for t in settings.targets)})"
    return qwix.LoraProvider(module_path=pattern, rank=int(settings.rank), alpha=float(settings.alpha))


def wrap(module: nn.Module, settings: LoraSettings) -> nn.Module:
    """`module` (a causal LM or score model of any family) with adapters on settings.targets: the
    same call signature and methods; its params are `combine(base, adapters, dtype)`."""
    methods = [m for m in ("__call__", "last_token_logits") if hasattr(type(module), m)]
    return qwix.apply_lora_to_model(module, _provider(settings), methods=methods)


def is_adapter_path(path: tuple[str, ...]) -> bool:
    return path[-1] in SUFFIXES


def split(params: Any) -> tuple[dict, dict]:
    """params (base + adapters, boxed or not) -> (base, adapters), two nested dicts."""
    flat = traverse_util.flatten_dict(params)
    base = {k: v for k, v in flat.items() if not is_adapter_path(k)}
    adapters = {k: v for k, v in flat.items() if is_adapter_path(k)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def combine(base: Any, adapters: Any, dtype=None) -> dict:
    """The params of a `wrap`ped module: base with the adapters (cast to `dtype`, the compute dtype) beside
    their kernels. Other leaves of `adapters` (a LoRA critic's trained score head) replace the base's
    as they are."""
    flat = traverse_util.flatten_dict(base)
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
    flat.update({k: cast(v) if is_adapter_path(k) else v for k, v in traverse_util.flatten_dict(adapters).items()})
    return traverse_util.unflatten_dict(flat)


def on_base(fn, dtype=None):
    """fn(params, *args) -> g(adapters, *args, base) = fn(combine(base, adapters, dtype), *args): a
    function of a `wrap`ped model's params as a function of its adapters, the frozen base passed last
    (the `frozen` argument of loop.train's loss_fn / metrics_fn). Gradients flow to the adapters only."""

    def apply(adapters, *args):
        *args, base = args
        return fn(combine(base, adapters, dtype), *args)

    return apply


def _lead(kernel_shape, a_shape) -> tuple[int, int]:
    """(number of leading [L] dims, number of kernel input dims) of a kernel and its A."""
    lead = len(a_shape) - 2
    n_in, size = a_shape[-2], 1
    for k in range(lead, len(kernel_shape)):
        size *= kernel_shape[k]
        if size == n_in:
            return lead, k + 1 - lead
    raise ValueError(f"LoRA A {a_shape} does not match kernel {kernel_shape}")


def merge(base: Any, adapters: Any, settings: LoraSettings) -> dict:
    """Plain params of the base model with every adapter folded in: W + alpha/r * A @ B (in fp32,
    cast to W's dtype). Works inside jit (the sampler's weights) and on host arrays (export)."""
    flat = traverse_util.flatten_dict(base)
    flat_adapters = traverse_util.flatten_dict(adapters)
    for key, a in flat_adapters.items():
        if key[-1] != "kernel_lora_a":
            continue
        b = flat_adapters[key[:-1] + ("kernel_lora_b",)]
        kernel = flat[key[:-1] + ("kernel",)]
        lead, _ = _lead(kernel.shape, a.shape)
        n_in, n_out = a.shape[-2], b.shape[-1]
        delta = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)) * settings.scale
        w = jnp.asarray(kernel, jnp.float32).reshape(kernel.shape[:lead] + (n_in, n_out)) + delta
        flat[key[:-1] + ("kernel",)] = w.reshape(kernel.shape).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def _fix_names(boxed: Any) -> Any:
    """Re-derive the logical axes of every A / B box from its kernel's: A (*lead, first input axis,
    None), B (*lead, None, first output axis)."""
    flat = traverse_util.flatten_dict(boxed)
    for key, box in list(flat.items()):
        if not is_adapter_path(key):
            continue
        kernel = flat[key[:-1] + ("kernel",)]
        names = tuple(kernel.names)
        a_shape = flat[key[:-1] + ("kernel_lora_a",)].value.shape
        lead, n_in_dims = _lead(kernel.value.shape, a_shape)
        if key[-1] == "kernel_lora_a":
            new = names[:lead] + (names[lead], None)
        else:
            new = names[:lead] + (None, names[lead + n_in_dims])
        flat[key] = dataclasses.replace(box, names=new)
    return traverse_util.unflatten_dict(flat)


def adapter_init_fn(module: nn.Module, settings: LoraSettings):
    """rng -> the fresh adapters of `module` (fp32), boxed with their logical axes. The base
    params are traced but dropped (under jit nothing of them is computed)."""
    cfg32 = dataclasses.replace(module.cfg, dtype="float32", param_dtype="float32")
    wrapped = wrap(module.clone(cfg=cfg32), settings)

    def init(rng):
        # No axis rules while qwix boxes the adapters: its update_boxed unboxes each new 2-D adapter
        # with the kernel's N-D names (a rank error under the rules); the names are fixed below.
        with nn.logical_axis_rules(()):
            boxed = wrapped.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
        adapters = _fix_names(boxed)
        return split(adapters)[1]

    return init


def init_adapters(module: nn.Module, settings: LoraSettings, rng: jax.Array, mesh, rules) -> tuple[dict, dict]:
    """Fresh adapters of `module` (B = 0) created in their shardings. -> (adapters, shardings)."""
    from jaxalign.parallel import mesh as mesh_lib

    return mesh_lib.init_sharded(adapter_init_fn(module, settings), rng, mesh, rules)


def abstract_adapters(module: nn.Module, settings: LoraSettings, mesh, rules) -> dict:
    """ShapeDtypeStructs of `module`'s adapters, each with its sharding (AOT plans; nothing allocated)."""
    from jaxalign.parallel import mesh as mesh_lib

    init = adapter_init_fn(module, settings)
    with mesh_lib.sharding_context(mesh, rules):
        boxed = jax.eval_shape(init, mesh_lib.abstract_key())
        shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
    return mesh_lib.with_shardings(nn.meta.unbox(boxed), shardings)


def num_bytes(tree: Any) -> int:
    """Bytes of the arrays (or ShapeDtypeStructs) of a pytree."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- PEFT layout


def _layers(adapters: dict) -> dict[int, dict]:
    """{layer index: that layer's adapter tree} of a causal LM's adapters (scanned or not)."""
    backbone = adapters["model"]
    if "layers" in backbone:
        stacked = backbone["layers"]
        n = jax.tree.leaves(stacked)[0].shape[0]
        return {i: jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked) for i in range(n)}
    return {int(k[len("layers_"):]): jax.tree.map(np.asarray, v) for k, v in backbone.items()
            if k.startswith("layers_")}


def to_peft(adapters: dict, dtype=np.float32) -> dict[str, np.ndarray]:
    """A causal LM's adapters (host or device arrays) -> HF PEFT tensors
    base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_A.weight [r, in] / lora_B.weight [out, r]."""
    out = {}
    for i, layer in sorted(_layers(adapters).items()):
        for group, modules in layer.items():
            for proj, leaves in modules.items():
                prefix = f"base_model.model.model.layers.{i}.{group}.{proj}"
                # contiguous copies: safetensors writes an array's buffer as is, whatever its strides
                out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(leaves["kernel_lora_a"], dtype).T)
                out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(leaves["kernel_lora_b"], dtype).T)
    return out


def from_peft(tensors, cfg, settings: LoraSettings) -> dict:
    """HF PEFT tensors (a mapping name -> array) -> the adapter tree of causal_lm(cfg) (fp32),
    stacked [L, ...] when cfg.scan_layers. A missing tensor raises KeyError naming it."""
    layers = []
    for i in range(cfg.num_hidden_layers):
        layer: dict = {}
        for proj in settings.targets:
            group = _MODULE_GROUP[proj]
            prefix = f"base_model.model.model.layers.{i}.{group}.{proj}"
            layer.setdefault(group, {})[proj] = {
                "kernel_lora_a": np.asarray(tensors[f"{prefix}.lora_A.weight"], np.float32).T,
                "kernel_lora_b": np.asarray(tensors[f"{prefix}.lora_B.weight"], np.float32).T,
            }
        layers.append(layer)
    if cfg.scan_layers:
        return {"model": {"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)}}
    return {"model": {f"layers_{i}": layer for i, layer in enumerate(layers)}}


def peft_config(settings: LoraSettings, base_model: str = "") -> dict:
    """adapter_config.json of HF PEFT for these adapters."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(settings.rank), "lora_alpha": float(settings.alpha),
            "lora_dropout": 0.0, "target_modules": list(settings.targets), "bias": "none", "fan_in_fan_out": False,
            "base_model_name_or_path": base_model}


def settings_from_peft(config: dict, where: str) -> LoraSettings:
    """LoraSettings of an adapter_config.json dict (HF PEFT); ValueError naming `where` otherwise."""
    if config.get("peft_type") != "LORA" or "r" not in config or "lora_alpha" not in config:
        raise ValueError(f"{where}: not a LoRA adapter config (needs peft_type LORA, r, lora_alpha)")
    targets = config.get("target_modules") or TARGETS
    return LoraSettings(rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=tuple(targets), where=where)
