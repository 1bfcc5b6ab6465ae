"""Metrics sinks: WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard.

    writer = MetricWriter(workdir)
    writer.write(step, {"loss": 1.2, "lr": 2e-5})            # -> {"step": 3, "loss": 1.2, ...}
    writer.write(step, {"accuracy": 0.7}, prefix="eval/")    # -> {"step": 3, "eval/accuracy": 0.7}
    writer.close()

Only process 0 writes. Values are converted to Python floats/ints; non-scalars are skipped in
TensorBoard and written as lists in JSON. On resume the JSONL file is truncated to the steps
already covered by the restored checkpoint (`truncate_after`), so an interrupted-then-resumed run
produces the same file as an uninterrupted one.

A run killed mid-write (SIGKILL, full disk) can leave a torn last line: readers drop it with a
warning naming the file (`parse_metrics_file` counts it), and the writer removes it before
appending. A malformed line anywhere else is a `MetricsFileError` naming FILE:LINE.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np

from jaxalign import files


def to_python(value: Any) -> Any:
    """jax/numpy scalar or small array -> float/int/bool/list."""
    array = np.asarray(jax.device_get(value))
    if array.ndim == 0:
        item = array.item()
        return item
    return array.tolist()


class MetricsFileError(ValueError):
    """A metrics.jsonl line that is not a record; the message names FILE:LINE."""


def _parse_record(line: bytes) -> tuple[dict | None, str]:
    """(record, "") or (None, why it is not a record)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, str(error)
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
        return None, 'no integer "step"'
    return record, ""


def parse_metrics_file(path: str | pathlib.Path) -> tuple[list[dict[str, Any]], int]:
    """(records in order, number of torn last lines dropped: 0 or 1) of a metrics.jsonl file.

    Blank lines are skipped. An unparseable LAST line is what a kill mid-write leaves: it is
    dropped and logged as a warning naming the file. An unparseable line before it raises
    MetricsFileError naming FILE:LINE.
    """
    path = pathlib.Path(path)
    lines = [(number, line) for number, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    records, dropped = [], 0
    for index, (number, line) in enumerate(lines):
        record, problem = _parse_record(line)
        if record is not None:
            records.append(record)
        elif index == len(lines) - 1:
            dropped = 1
            logging.warning(
                "%s:%d: dropped a torn last line (%d bytes, %r...): left by a run killed mid-write",
                path, number, len(line), line[:40].decode("utf-8", "replace"),
            )
        else:
            raise MetricsFileError(
                f"{path}:{number}: not a metrics record ({problem}): {line[:80].decode('utf-8', 'replace')!r}"
            )
    return records, dropped


def _write_records(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
    """Replaces `path` atomically with `records`, one JSON line each."""
    files.write_text(path, "".join(json.dumps(record, allow_nan=True) + "\n" for record in records))


class MetricWriter:
    """Appends metrics to WORKDIR/metrics.jsonl and WORKDIR/tensorboard/ (process 0 only)."""

    def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_torn_tail()
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def _drop_torn_tail(self) -> None:
        """A file not ending in a newline was cut mid-write: rewrite it without the torn line,
        so the next record starts on a line of its own."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
        records, _ = parse_metrics_file(self.path)
        _write_records(self.path, records)

    def truncate_after(self, step: int) -> None:
        """Drops logged records with step > `step` (they are replayed after a resume), and a
        torn last line."""
        if not self.enabled or not self.path.exists():
            return
        records, _ = parse_metrics_file(self.path)
        _write_records(self.path, [record for record in records if record["step"] <= step])

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
    """All records of WORKDIR/metrics.jsonl, in order (a torn last line is dropped with a warning;
    a malformed line before it is a MetricsFileError naming FILE:LINE)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return parse_metrics_file(path)[0]
