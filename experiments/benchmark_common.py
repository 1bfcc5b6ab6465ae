"""What the benchmarks share: AOT memory readings, TPU HBM fit checks, per-part subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

GIB = 1024**3
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}  # HBM per chip


def memory_of(compiled) -> dict:
    """Per-device byte counts of a compiled jit (`.memory_analysis()`), with the live peak."""
    stats = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {name: int(getattr(stats, name, 0) or 0) for name in fields}
    # Donated state: outputs alias arguments, so the live peak is arguments + temporaries + new outputs.
    out["peak_bytes"] = (
        out["argument_size_in_bytes"] + out["temp_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
    )
    return out


def fits(peak_bytes: int) -> dict[str, bool]:
    """{TPU generation: peak fits in 90% of its HBM}."""
    return {gen: peak_bytes < 0.9 * hbm * GIB for gen, hbm in TPU_HBM_GIB.items()}


def run_child(script: str, part: str, devices: int, extra_args: list[str]) -> list[dict]:
    """Runs `script --part PART` on `devices` simulated CPU devices; returns its RESULT lines as dicts.
    The child's stderr (logs, progress bars) goes straight to ours. XLA_FLAGS of the environment
    are kept (e.g. to compare XLA:CPU flags); the device count is appended."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    print(f"{part}: {script} on {devices} simulated CPU device(s)", file=sys.stderr, flush=True)
    process = subprocess.run([sys.executable, script, "--part", part, *extra_args], env=env,
                             stdout=subprocess.PIPE, text=True)
    if process.returncode:
        raise RuntimeError(f"{part} benchmark failed (exit {process.returncode}; its stderr is above)")
    return [json.loads(line[len("RESULT "):]) for line in process.stdout.splitlines() if line.startswith("RESULT ")]


def print_memory_table(title: str, rows: list[dict], label_key: str, width: int) -> None:
    """The per-device memory table of AOT memory plans (rows carry memory_of fields + fits)."""
    print(f"\n{title}")
    header = (f"{label_key:{width}s} {'devices':>7s} {'batch':>6s} {'args GiB':>9s} {'temp GiB':>9s} "
              f"{'peak GiB':>9s}  fits (90% HBM)")
    print(header)
    print("-" * len(header))
    for m in rows:
        fit = " ".join(f"{gen}:{'y' if ok else 'n'}" for gen, ok in m["fits"].items())
        print(f"{m[label_key]:{width}s} {m['devices']:7d} {m['global_batch']:6d} {m['argument_size_in_bytes'] / GIB:9.2f} "
              f"{m['temp_size_in_bytes'] / GIB:9.2f} {m['peak_bytes'] / GIB:9.2f}  {fit}")
