"""Compile steps for a TPU slice and read what each costs: memory per chip, flops, bytes,
collectives, and a roofline time.

    plans = compile_steps([Step("train", jitted, abstract_args, tokens=B * T, passes=[...])], topology, mesh, rules)
    plans[0].peak_bytes, plans[0].fits, plans[0].roofline_s, plans[0].mfu

A Step is a jitted function of a stage with abstract arguments (jax.ShapeDtypeStruct with
NamedShardings on a mesh of compile-only devices): lowering and compiling it allocates nothing.

Memory (per chip, from `compiled.memory_analysis()`): arguments, outputs, temporaries; outputs that
alias donated arguments are counted once, so peak = arguments + temporaries + outputs - aliased.
A step fits when its peak is at most FIT_FRACTION of the chip's HBM (the rest is left to the runtime
and fragmentation). The TPU compiler refuses a program whose temporaries exceed the HBM
("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (23.28G)
exceeds available HBM (15.75G)"): such a step is compiled again with xla_tpu_no_crash_on_oom for its
arguments, outputs and cost, and its temporaries are the compiler's stated requirement (`oom`).

Roofline time (per step, the chips working in parallel): max(flops / bf16 peak, HBM bytes / HBM
bandwidth) + collective bytes / ICI bandwidth (chips.ici_seconds), flops and HBM bytes per chip with
every loop iteration counted (hlo.program_cost; the HBM bytes are an estimate from the program). The collectives are added, not overlapped: an upper
bound on communication that XLA may hide behind compute. tokens/s per chip = tokens / time / chips;
MFU = model flops (flops.model_flops of the step's passes) / (time x chips x peak). These are
estimates from the compiler's program and the vendor's figures, not measured times.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import tqdm

from jaxalign.parallel import mesh as mesh_lib
from jaxalign.plan import chips as chips_lib
from jaxalign.plan import flops as flops_lib
from jaxalign.plan import hlo

FIT_FRACTION = 0.9
GIB = chips_lib.GIB


@dataclasses.dataclass(frozen=True)
class Step:
    """One compiled step of a stage, ready to lower: `fn` is jitted; `args` are abstract."""

    name: str
    fn: Callable
    args: tuple
    tokens: int  # tokens the step processes (all chips together), for tokens/s
    passes: tuple[flops_lib.Pass, ...] = ()  # model runs, for MFU
    note: str = ""  # what the step runs, shown in the report


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What the TPU compiler says about one step on one slice."""

    name: str
    note: str
    topology: str
    chips: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    peak_flops: float  # the chip's bf16 FLOP/s
    flops: float  # per chip, loops counted
    hbm_traffic: float  # per chip: the estimated HBM bytes moved (hlo.py)
    bytes_accessed: float  # per chip: XLA's bytes accessed, loops counted (an upper bound)
    collectives: tuple[hlo.Collective, ...]
    compute_s: float
    memory_s: float
    ici_s: float
    tokens: int
    model_flops: float  # all chips
    compile_s: float
    oom: bool = False  # the compiler refused it: temp_bytes is what it said the program needs

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def fits(self) -> bool:
        return not self.oom and self.peak_bytes <= FIT_FRACTION * self.hbm_bytes

    @property
    def roofline_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.ici_s

    @property
    def bound(self) -> str:
        """What the roofline time is mostly made of: compute, memory or ici."""
        parts = {"compute": self.compute_s, "memory": self.memory_s, "ici": self.ici_s}
        return max(parts, key=parts.get)

    @property
    def tokens_per_s_per_chip(self) -> float:
        return self.tokens / self.roofline_s / self.chips if self.roofline_s > 0 else 0.0

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.roofline_s * self.chips * self.peak_flops) if self.roofline_s > 0 else 0.0

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["collectives"] = [dataclasses.asdict(c) for c in self.collectives]
        out.update(peak_bytes=self.peak_bytes, fits=self.fits, roofline_s=self.roofline_s, bound=self.bound,
                   tokens_per_s_per_chip=self.tokens_per_s_per_chip, mfu=self.mfu)
        return out


def argument_bytes(step: Step) -> int:
    """Bytes of a step's arguments, all chips together (params, optimizer state, frozen models, batch)."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(step.args)))


_OOM = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                  r"\(([\d.]+)G\) exceeds available HBM")


def compile_step(step: Step) -> tuple[Any, int | None]:
    """(compiled, None), or for a step the TPU compiler refuses for lack of HBM (compiled with
    xla_tpu_no_crash_on_oom, the temporaries it said it needs)."""
    lowered = step.fn.lower(*step.args)
    try:
        return lowered.compile(), None
    except jax.errors.JaxRuntimeError as error:
        match = _OOM.search(str(error))
        if match is None:
            raise
        return lowered.compile(compiler_options={"xla_tpu_no_crash_on_oom": True}), int(float(match.group(1)) * GIB)


def analyse(step: Step, compiled: Any, topology: chips_lib.Topology, compile_s: float,
            required_temp: int | None = None) -> StepPlan:
    """The StepPlan of `step` compiled for `topology` (required_temp: see compile_step)."""
    stats = compiled.memory_analysis()
    memory = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
              for name in ("argument", "output", "alias", "temp", "generated_code")}
    if required_temp is not None:
        memory["temp"] = required_temp
    cost_analysis = compiled.cost_analysis()
    if isinstance(cost_analysis, list):  # older jax: one dict per program
        cost_analysis = cost_analysis[0]
    cost = hlo.program_cost(compiled.as_text(), cost_analysis, topology.chips)
    chip = topology.chip
    return StepPlan(
        name=step.name, note=step.note, topology=topology.name, chips=topology.chips,
        argument_bytes=memory["argument"], output_bytes=memory["output"], alias_bytes=memory["alias"],
        temp_bytes=memory["temp"], code_bytes=memory["generated_code"], hbm_bytes=chip.hbm_bytes,
        peak_flops=chip.bf16_flops,
        flops=cost.flops, hbm_traffic=cost.hbm_bytes, bytes_accessed=cost.bytes_accessed, collectives=cost.collectives,
        compute_s=cost.flops / chip.bf16_flops, memory_s=cost.hbm_bytes / chip.hbm_bandwidth,
        ici_s=chips_lib.ici_seconds(topology, cost.collective_bytes), tokens=step.tokens,
        model_flops=flops_lib.model_flops(list(step.passes)), compile_s=compile_s, oom=required_temp is not None)


def compile_steps(steps: list[Step], topology: chips_lib.Topology, mesh, rules, progress: bool = True) -> list[StepPlan]:
    """Lower and compile every step for the slice (a tqdm bar on stderr) -> their StepPlans."""
    plans = []
    bar = tqdm.tqdm(steps, desc=f"compiling for {topology.name}", unit="step", file=sys.stderr, disable=not progress,
                    leave=False)
    for step in bar:
        bar.set_postfix_str(step.name)
        start = time.perf_counter()
        with mesh_lib.sharding_context(mesh, rules):
            compiled, required_temp = compile_step(step)
        plans.append(analyse(step, compiled, topology, time.perf_counter() - start, required_temp))
    bar.close()
    return plans
