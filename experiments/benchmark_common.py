"""What the benchmarks share: per-part subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

GIB = 1024**3


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
