"""The smallest TPU slice on which every step of a stage fits, over meshes and RL minibatches.

    result = smallest_fit(chips.CHIPS["v5e"], try_layout, min_bytes=state_bytes, batch_rows=128, rl=True)
    result.best  # Try(topology="v5e-16", data=1, fsdp=16, tensor=1, num_minibatches=4, ...)

Slices of the chip are tried from the smallest whose HBM can hold `min_bytes` (the largest step's
arguments: params, optimizer state, frozen models, all chips together). On each slice the meshes
are data=1 x fsdp x tensor with tensor in 1, 2, 4, 8 (fsdp first: it shards the state; tensor also
splits each layer's activations), keeping the batch divisible by the batch shards. For an RL stage
each mesh compiles the rollout and scoring steps once and the update step with rl.num_minibatches
1, 2, 4, ... (only the update's micro-batch changes) until it fits.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable

import tqdm

from jaxalign.plan import chips as chips_lib
from jaxalign.plan import steps as steps_lib

MINIBATCHES = (1, 2, 4, 8, 16)
TENSOR = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Try:
    """One compiled layout: its slice, mesh, minibatches and each step's peak bytes per chip."""

    topology: str
    data: int
    fsdp: int
    tensor: int
    num_minibatches: int | None
    peaks: dict  # {step: peak bytes per chip}
    fits: bool
    error: str = ""


@dataclasses.dataclass(frozen=True)
class SearchResult:
    chip: str
    tries: tuple[Try, ...]
    best: Try | None


def layouts(num_chips: int, batch_rows: int) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) meshes of num_chips whose batch shards divide batch_rows."""
    out = []
    for tensor in TENSOR:
        if num_chips % tensor:
            continue
        fsdp = num_chips // tensor
        if fsdp >= 1 and batch_rows % fsdp == 0:
            out.append((1, fsdp, tensor))
    return out


def smallest_fit(chip: chips_lib.ChipSpec, try_layout: Callable, *, min_bytes: float, batch_rows: int,
                 rl: bool = False, rollout_rows: int | None = None, max_chips: int = 256,
                 progress: bool = True) -> SearchResult:
    """Searches slices of `chip` (see the module docstring).

    try_layout(topology, (data, fsdp, tensor), num_minibatches or None, only) -> [StepPlan] compiles
    the steps named in `only` ("" = all) and raises ValueError for a layout the stage refuses.
    batch_rows: config.data.batch_size; rollout_rows: the RL rollout's rows (batch x return sequences)."""
    min_chips = max(1, math.ceil(min_bytes / (steps_lib.FIT_FRACTION * chip.hbm_bytes)))
    tries: list[Try] = []
    slices = [s for s in chips_lib.smallest_slices(chip, min_chips) if s.chips <= max_chips]
    bar = tqdm.tqdm(total=len(slices), desc=f"searching {chip.name} slices", unit="slice", file=sys.stderr,
                    disable=not progress, leave=False)
    try:
        for topology in slices:
            bar.set_postfix_str(topology.name)
            for layout in layouts(topology.chips, batch_rows):
                found = _try_mesh(topology, layout, try_layout, rl, batch_rows, rollout_rows or batch_rows, tries)
                if found is not None:
                    return SearchResult(chip.name, tuple(tries), found)
            bar.update(1)
    finally:
        bar.close()
    return SearchResult(chip.name, tuple(tries), None)


def _record(tries: list, topology, layout, k, plans=(), error: str = "", peaks: dict | None = None) -> Try:
    peaks = dict(peaks or {})
    peaks.update({p.name: p.peak_bytes for p in plans})
    fits = not error and all(p.fits for p in plans)
    tries.append(Try(topology.name, *layout, k, peaks, fits, error))
    return tries[-1]


def _try_mesh(topology, layout, try_layout, rl: bool, batch_rows: int, rollout_rows: int, tries: list) -> Try | None:
    """The first fitting minibatch count of one mesh, or None."""
    fsdp = layout[0] * layout[1]
    if not rl:
        try:
            plans = try_layout(topology, layout, None, ())
        except ValueError as error:
            _record(tries, topology, layout, None, error=str(error))
            return None
        found = _record(tries, topology, layout, None, plans)
        return found if found.fits else None
    try:
        fixed = try_layout(topology, layout, 1, ("rollout", "scoring"))
    except ValueError as error:
        _record(tries, topology, layout, 1, error=str(error))
        return None
    if not all(p.fits for p in fixed):
        _record(tries, topology, layout, 1, fixed)
        return None
    for k in MINIBATCHES:
        if batch_rows % (k * fsdp) or rollout_rows % (k * fsdp):
            break
        try:
            update = try_layout(topology, layout, k, ("update",))
        except ValueError as error:
            _record(tries, topology, layout, k, error=str(error))
            return None
        found = _record(tries, topology, layout, k, update, peaks={p.name: p.peak_bytes for p in fixed})
        if found.fits:
            return found
    return None
