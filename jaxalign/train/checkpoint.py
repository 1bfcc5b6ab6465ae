"""Orbax checkpoints of a training run: state pytree + data-iterator state, resumable exactly.

    ckpt = Checkpointer(workdir / "checkpoints", config.checkpoint)
    step = ckpt.latest_step()                                   # None on a fresh run
    state, data_state = ckpt.restore(step, abstract_state)      # ShapeDtypeStructs with shardings
    ...
    ckpt.save(step, state, data_state)                          # async; force it at the end
    if ckpt.preempted: ...                                       # SIGTERM/SIGINT seen: save and exit
    ckpt.close()                                                 # waits for pending saves

A checkpoint is the directory CHECKPOINTS/<step>/ with two items:
  state: any pytree of jax.Arrays (a `TrainState`, or a dict of several for RL), written with
         `StandardSave`; restored with `StandardRestore(abstract)` where `abstract` carries the
         target shardings, so a run saved on one mesh restores onto another.
  data:  a JSON dict (the data iterator's `get_state()`, plus anything small a stage needs).

Orbax writes each step into a temporary directory and renames it when complete, so a save cut off
by a crash is never listed by `latest_step()` (and leftover tmp dirs are removed on startup).
"""

from __future__ import annotations

import logging
import pathlib
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Checkpointer:
    """CheckpointManager with keep-last-K, optional async saves and a preemption flag.

    Args:
      directory: where step directories live (created if missing).
      checkpoint_config: `config.checkpoint` (save_every, keep, async_save).
      handle_signals: install SIGTERM/SIGINT handlers that set `preempted` instead of killing
        the process, so the loop can save before exiting (main thread only).
    """

    def __init__(self, directory: str | pathlib.Path, checkpoint_config, handle_signals: bool = True):
        self.directory = pathlib.Path(directory).resolve()
        self.save_every = int(checkpoint_config.save_every)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(max(int(checkpoint_config.keep), 1)),
            enable_async_checkpointing=bool(checkpoint_config.async_save),
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)
        self._signal_seen: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self._signal_seen is not None:
            # A second signal: give up on the graceful path.
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: exiting without waiting")
        self._signal_seen = signum
        logging.warning("%s received: saving a checkpoint after the current step", signal.Signals(signum).name)

    @property
    def preempted(self) -> bool:
        """True once SIGTERM/SIGINT arrived (on any host, when running multi-host)."""
        local = self._signal_seen is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        # All hosts must agree, or the collective save below would hang.
        return bool(multihost_utils.process_allgather(jax.numpy.asarray(local)).any())

    @property
    def signal_number(self) -> int | None:
        return self._signal_seen

    def latest_step(self) -> int | None:
        """The newest complete checkpoint step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True every `save_every` updates (0 disables periodic saves)."""
        return self.save_every > 0 and step > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, data_state: dict | None = None) -> None:
        """Starts saving `state` and the JSON `data_state` as step `step` (async if configured)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state or {}),
            ),
            force=True,
        )

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """Restores (state, data_state) of `step` (None = latest) into `abstract_state`'s shardings.

        abstract_state: pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` (see
        `jaxalign.parallel.mesh.with_shardings`) with the structure of the saved state.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["data"] or {})

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and restores the previous signal handlers."""
        self.manager.wait_until_finished()
        self.manager.close()
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
