"""The plan as text and JSON: per-step memory, cost and roofline tables, the chip table with its
sources, the search's tries, and the launch command of the slice."""

from __future__ import annotations

import dataclasses
import shlex

from jaxalign.plan import chips as chips_lib
from jaxalign.plan import search as search_lib
from jaxalign.plan import steps as steps_lib

GIB = chips_lib.GIB


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def chip_table() -> str:
    """The chips' published figures and their sources."""
    rows = [[c.name, f"{c.bf16_flops / 1e12:.0f}", f"{c.hbm_gib:.0f}", f"{c.hbm_bandwidth / 1e9:.0f}",
             f"{c.ici_bandwidth / 1e9:.0f}", c.source] for c in chips_lib.CHIPS.values()]
    return _table(["chip", "bf16 TFLOP/s", "HBM GiB", "HBM GB/s", "ICI GB/s (bidi)", "source"], rows)


def launch_command(topology: chips_lib.Topology, config_path: str, overrides=()) -> str:
    """The multi-host launch of a training run on the slice: the same command on every host, the
    prepared data and the run directory on storage every host mounts (docs/tpu.md)."""
    train = ["jaxalign", "train", "--config", config_path, "--workdir", "/mnt/runs/RUN", *overrides,
             "--config.mesh.distributed=True", "--config.data.prepared_dir=/mnt/data/tfds"]
    if topology.chip.platform != "tpu":
        return f"# {topology.name}: one host\n{' '.join(shlex.quote(a) for a in train[:6] + list(overrides))}"
    accelerator = f"{'v5litepod' if topology.chip.name == 'v5e' else topology.chip.name}-{topology.name.split('-')[1]}"
    return (f"# {topology.name}: {topology.chips} chips on {topology.hosts} host(s); create it with\n"
            f"#   gcloud compute tpus tpu-vm create $TPU_NAME --zone=$ZONE --accelerator-type={accelerator} "
            f"--version=$RUNTIME_VERSION\n"
            f"# /mnt/data and /mnt/runs: storage every host mounts (e.g. Filestore); see docs/tpu.md\n"
            f"gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all \\\n"
            f"  --command={shlex.quote('cd ~/jaxalign && .venv/bin/' + ' '.join(shlex.quote(a) for a in train))}")


def render(plans: list[steps_lib.StepPlan], topology: chips_lib.Topology, mesh: str, config_path: str = "",
           overrides=()) -> str:
    """The plan of one slice as text."""
    chip = topology.chip
    budget = steps_lib.FIT_FRACTION * chip.hbm_bytes / GIB
    out = [f"plan of {config_path or 'the config'} on {topology.name}: {topology.chips} x {chip.device_kind} "
           f"({chip.hbm_gib:.0f} GiB HBM each; fits = peak <= {budget:.1f} GiB), mesh {mesh}"]
    rows = [[p.name, f"{p.argument_bytes / GIB:.2f}", f"{p.temp_bytes / GIB:.2f}", f"{p.output_bytes / GIB:.2f}",
             f"{'>= ' if p.oom else ''}{p.peak_bytes / GIB:.2f}", "yes" if p.fits else "NO", f"{p.compile_s:.1f}"]
            for p in plans]
    compiler = "TPU compiler (libtpu)" if chip.platform == "tpu" else "GPU compiler (jax's CUDA plugin)"
    out += ["", f"memory per chip (GiB, from the {compiler})",
            _table(["step", "arguments", "temp", "outputs", "peak", "fits", "compile s"], rows)]
    rows = []
    for p in plans:
        rows.append([p.name, f"{p.flops / 1e12:.3g}", f"{p.hbm_traffic / 1e9:.3g}",
                     f"{sum(c.bytes for c in p.collectives) / 1e9:.3g}",
                     f"{_seconds(p.roofline_s)} ({p.bound})", f"{p.tokens_per_s_per_chip:,.0f}",
                     f"{100 * p.mfu:.1f}%"])
    out += ["", "cost per chip and roofline (estimates: max(flops/peak, HBM bytes/HBM bw) + collectives/ICI bw)",
            _table(["step", "TFLOP", "HBM GB", "ICI GB", "roofline", "tokens/s/chip", "MFU"], rows)]
    for p in plans:
        kinds = ", ".join(f"{c.kind} {c.bytes / 1e9:.3g} GB ({c.count}x)" for c in p.collectives) or "none"
        out.append(f"  {p.name}: {p.note}; collectives: {kinds}")
        if p.oom:
            out.append(f"  {p.name}: the compiler refused it: its temporaries alone need {p.temp_bytes / GIB:.2f} GiB "
                       f"of the chip's {p.hbm_bytes / GIB:.0f} GiB (arguments and outputs come on top)")
    out += ["", "chips (per chip)", chip_table(), "", "launch", launch_command(topology, config_path, overrides)]
    return "\n".join(out)


def render_search(result: search_lib.SearchResult) -> str:
    """The search's tries and its answer."""
    rows = []
    for t in result.tries:
        peaks = " ".join(f"{name} {value / GIB:.2f}" for name, value in t.peaks.items())
        rows.append([t.topology, f"{t.data}x{t.fsdp}x{t.tensor}", "-" if t.num_minibatches is None else
                     str(t.num_minibatches), peaks or t.error[:60], "yes" if t.fits else "no"])
    table = _table(["slice", "data x fsdp x tensor", "minibatches", "peak GiB per step", "fits"], rows)
    if result.best is None:
        answer = f"no {result.chip} slice tried fits every step"
    else:
        b = result.best
        answer = (f"smallest {result.chip} slice that fits: {b.topology} with --config.mesh.data={b.data} "
                  f"--config.mesh.fsdp={b.fsdp} --config.mesh.tensor={b.tensor}"
                  + ("" if b.num_minibatches is None else f" --config.rl.num_minibatches={b.num_minibatches}"))
    return f"\nsearch ({len(result.tries)} layouts compiled)\n{table}\n{answer}"


def to_json(plans: list[steps_lib.StepPlan], topology: chips_lib.Topology, config_json: str,
            found: search_lib.SearchResult | None = None) -> dict:
    """The plan as a JSON-serialisable dict."""
    import json

    out = {"topology": topology.name, "chip": dataclasses.asdict(topology.chip), "chips": topology.chips,
           "hosts": topology.hosts, "steps": [p.to_json() for p in plans], "config": json.loads(config_json)}
    if found is not None:
        out["search"] = {"tries": [dataclasses.asdict(t) for t in found.tries],
                         "best": None if found.best is None else dataclasses.asdict(found.best)}
    return out
