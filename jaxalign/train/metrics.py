"""Metrics sinks: WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard.

    writer = MetricWriter(workdir)
    writer.write(step, {"loss": 1.2, "lr": 2e-5})            # -> {"step": 3, "loss": 1.2, ...}
    writer.write(step, {"accuracy": 0.7}, prefix="eval/")    # -> {"step": 3, "eval/accuracy": 0.7}
    writer.close()

Only process 0 writes. Values are converted to Python floats/ints; non-scalars are skipped in
TensorBoard and written as lists in JSON. On resume the JSONL file is truncated to the steps
already covered by the restored checkpoint (`truncate_after`), so an interrupted-then-resumed run
produces the same file as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping

import jax
import numpy as np


def to_python(value: Any) -> Any:
    """jax/numpy scalar or small array -> float/int/bool/list."""
    array = np.asarray(jax.device_get(value))
    if array.ndim == 0:
        item = array.item()
        return item
    return array.tolist()


class MetricWriter:
    """Appends metrics to WORKDIR/metrics.jsonl and WORKDIR/tensorboard/ (process 0 only)."""

    def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops logged records with step > `step` (they are replayed after a resume)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """Writes one record {"step": step, prefix+name: value, ...}; returns it."""
        record = {"step": int(step)}
        for name, value in metrics.items():
            record[prefix + name] = to_python(value)
        if not self.enabled:
            return record
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    if math.isfinite(value):
                        self._tb.add_scalar(name, value, int(step))
            self._tb.flush()
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """All records of WORKDIR/metrics.jsonl, in order."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
