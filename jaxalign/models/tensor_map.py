"""How one HF (torch) tensor maps onto one of our parameters: the unit of a family's tensor map.

A family's map is `hf_layer_map(cfg) -> list[HFTensor]`, one entry per tensor of one decoder layer
(`model.layers.N.<suffix>` in HF). hf.py applies it to every layer; embeddings, final norm and
lm_head are the same for every family and live in hf.py.

Torch Linear weights are [out, in]; our kernels are [in, ...out] (q_proj [D, H, Dh], o_proj
[H, Dh, D]), so a projection converts by a reshape + transpose. Shapes are in torch layout.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np


class HFTensor(NamedTuple):
    """suffix: HF name inside a layer ("self_attn.q_proj.weight"); path: keys inside our layer
    params; to_hf(ours) -> torch layout; from_hf(torch) -> ours; shape: torch shape."""

    suffix: str
    path: tuple[str, ...]
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...]


def proj_in(suffix: str, path: tuple[str, ...], d: int, out_shape: tuple[int, ...]) -> HFTensor:
    """A projection out of the residual stream: kernel [D, *out] <-> torch [prod(out), D]."""
    n = math.prod(out_shape)
    return HFTensor(suffix, path, lambda k: k.reshape(d, n).T, lambda w: w.T.reshape((d,) + out_shape), (n, d))


def proj_out(suffix: str, path: tuple[str, ...], in_shape: tuple[int, ...], d: int) -> HFTensor:
    """A projection into the residual stream: kernel [*in, D] <-> torch [D, prod(in)]."""
    n = math.prod(in_shape)
    return HFTensor(suffix, path, lambda k: k.reshape(n, d).T, lambda w: w.T.reshape(in_shape + (d,)), (d, n))


def vector(suffix: str, path: tuple[str, ...], shape: tuple[int, ...]) -> HFTensor:
    """A bias or norm scale: ours `shape` <-> torch [prod(shape)]."""
    n = math.prod(shape)
    return HFTensor(suffix, path, lambda b: b.reshape(n), lambda w: w.reshape(shape), (n,))
