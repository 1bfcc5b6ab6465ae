"""The building blocks every decoder family composes: RoPE, projections, norms, embeddings and the
gated MLP (the attention layer is decoder.Attention, its math attention.py).

Modules take the family config (a `config.DecoderConfig` subclass) as `cfg`; every parameter
carries logical axis names (embed, mlp, heads, kv_heads, head_dim, vocab) so the sharding rules in
jaxalign/parallel/mesh.py map them onto mesh axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models import quantize, tensor_map

if TYPE_CHECKING:
    from jaxalign.models.config import DecoderConfig


# ----------------------------------------------------------------------------- RoPE

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: rope_type "linear" (factor) or "llama3" (all fields)."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def to_hf(self) -> dict:
        out = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


def parse_rope_scaling(rope: dict) -> RopeScaling | None:
    """RopeScaling of an HF rope_scaling / rope_parameters dict (None for "default"); a
    ValueError naming the key for anything unsupported."""
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_scaling rope_type={rope_type!r}; supported: {list(_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return None
    factor = rope.get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise ValueError(f"unsupported partial_rotary_factor={factor!r}; must be 1.0")
    needed = ["factor"]
    if rope_type == "llama3":
        needed += ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
    missing = [k for k in needed if rope.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} is missing keys: {missing}")
    if rope_type == "linear":
        return RopeScaling("linear", float(rope["factor"]))
    return RopeScaling(
        "llama3",
        float(rope["factor"]),
        float(rope["low_freq_factor"]),
        float(rope["high_freq_factor"]),
        int(rope["original_max_position_embeddings"]),
    )


def rope_inv_freq(dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [dim/2] fp32 of RoPE with base `theta`, with linear / llama3 scaling as in HF."""
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_angles(dim: int, theta: float, scaling: RopeScaling | None,
                positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of position * inv_freq: positions [B, T] -> two [B, T, dim/2] fp32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(dim, theta, scaling))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (HF layout). x [B, T, N, Dh], cos/sin [B, T, Dh/2]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- modules


def _normal(cfg: DecoderConfig):
    return nn.initializers.normal(stddev=cfg.initializer_range)


class Linear(nn.Module):
    """x [..., prod(in_shape)] @ kernel [*in_shape, *out_shape] -> [..., *out_shape].

    The matmul runs on a 2-D [N, in] view (much faster on XLA CPU than 3-D dots).
    """

    cfg: "DecoderConfig"
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of kernel dims: in axes then out axes
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_normal(cfg), self.axes),
            self.in_shape + self.out_shape,
            cfg.weight_dtype,
        )
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        lead = x.shape[: x.ndim - len(self.in_shape)]
        y = quantize.matmul(cfg, x.reshape(-1, n_in), quantize.as_matrix(kernel, n_in, n_out))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.axes[len(self.in_shape) :]),
                self.out_shape,
                cfg.weight_dtype,
            )
            y = y + bias.reshape(n_out).astype(cfg.compute_dtype)
        return y.reshape(lead + self.out_shape)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * scale over the last axis, computed in fp32.
    [..., N] -> [..., N] (compute dtype). N is `dim` (default hidden_size) with logical axis
    `axis`: the per-head q/k norm of Qwen3 is RMSNorm(cfg, dim=head_dim, axis="head_dim").
    A family with another norm subclasses it and overrides `init_scale` / `gain` (gemma.GemmaRMSNorm:
    scale initialised to 0, gain 1 + scale)."""

    cfg: "DecoderConfig"
    dim: int | None = None
    axis: str = "embed"

    init_scale = staticmethod(nn.initializers.ones)

    @staticmethod
    def gain(scale: jax.Array) -> jax.Array:
        """The fp32 multiplier of the normalised x, from the stored scale."""
        return scale

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(self.init_scale, (self.axis,)),
            (cfg.hidden_size if self.dim is None else self.dim,),
            cfg.weight_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        return (y * self.gain(scale.astype(jnp.float32))).astype(cfg.compute_dtype)


class Embed(nn.Module):
    """Token embedding [V, D]; `attend` gives tied-embedding logits."""

    cfg: "DecoderConfig"

    def setup(self):
        cfg = self.cfg
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(_normal(cfg), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size),
            cfg.weight_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [B, T] -> [B, T, D] in the compute dtype."""
        return jnp.take(self.embedding, ids, axis=0).astype(self.cfg.compute_dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        """h [B, T, D] -> logits [B, T, V] fp32 (h @ embedding.T)."""
        b, t, d = h.shape
        logits = quantize.matmul(self.cfg, h.reshape(b * t, d), self.embedding.T, out=jnp.float32)
        return logits.reshape(b, t, -1)


ACTIVATIONS = {
    "silu": nn.silu,
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),  # torch gelu(approximate="tanh")
    "gelu": lambda x: nn.gelu(x, approximate=False),
}
# The MLP's projection kernels (both layouts) by param key -> leading axes the matmul contracts.
MLP_KERNELS = (("gate_up_proj", 1), ("gate_proj", 1), ("up_proj", 1), ("down_proj", 1))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)) (SwiGLU with silu, GeGLU with gelu_pytorch_tanh).
    [B, T, D] -> [B, T, D]. In the decode layout (cfg.decode_layout) gate and up are one kernel
    "gate_up_proj" [D, F, 2] ([..., 0] = gate)."""

    cfg: "DecoderConfig"
    activation: str = "silu"  # a key of ACTIVATIONS (HF hidden_act / hidden_activation)
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, self.use_bias
        if cfg.decode_layout is not None:  # one [D, F, 2] kernel (layouts.fuse_projections): one matmul
            gate_up = Linear(cfg, (d,), (f, 2), ("embed", "mlp", None), bias, name="gate_up_proj")(x)
            gate, up = gate_up[..., 0], gate_up[..., 1]
        else:
            gate = Linear(cfg, (d,), (f,), ("embed", "mlp"), bias, name="gate_proj")(x)
            up = Linear(cfg, (d,), (f,), ("embed", "mlp"), bias, name="up_proj")(x)
        hidden = nn.with_logical_constraint(ACTIVATIONS[self.activation](gate) * up, ("batch", "length", "mlp"))
        return Linear(cfg, (f,), (d,), ("mlp", "embed"), bias, name="down_proj")(hidden)


def mlp_hf_tensors(cfg: DecoderConfig, use_bias: bool, prefix: str = "mlp") -> list[tensor_map.HFTensor]:
    """The HF tensors of an MLP at `prefix` of a layer (HF *MLP: gate_proj / up_proj / down_proj)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    spec = [
        tensor_map.proj_in(f"{prefix}.gate_proj.weight", (prefix, "gate_proj", "kernel"), d, (f,)),
        tensor_map.proj_in(f"{prefix}.up_proj.weight", (prefix, "up_proj", "kernel"), d, (f,)),
        tensor_map.proj_out(f"{prefix}.down_proj.weight", (prefix, "down_proj", "kernel"), (f,), d),
    ]
    if use_bias:
        spec += [
            tensor_map.vector(f"{prefix}.gate_proj.bias", (prefix, "gate_proj", "bias"), (f,)),
            tensor_map.vector(f"{prefix}.up_proj.bias", (prefix, "up_proj", "bias"), (f,)),
            tensor_map.vector(f"{prefix}.down_proj.bias", (prefix, "down_proj", "bias"), (d,)),
        ]
    return spec

