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

Integrity: once a save is finalised (checked at the next save, `wait()` or `close()`; hashed in a
background thread), process 0 writes CHECKPOINTS/<step>/jaxalign_manifest.json with the size and
sha256 of every file of the step. `latest_step()` returns the newest step whose files still match
(a flipped byte or a truncated file -> a warning naming the step and the file, then the next older
step); when no step is intact it raises `CheckpointCorruptError`. A step without a manifest (saved
before this existed, or the run died between the save and its manifest) is used unverified.
Saving over a step found corrupted replaces it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import pathlib
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxalign import files

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

MANIFEST_NAME = files.MANIFEST_NAME


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the step and directory (and file)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint's files no longer match the manifest written when it was saved."""


def write_manifest(step_dir: str | pathlib.Path) -> pathlib.Path:
    """Writes STEP_DIR/jaxalign_manifest.json: {"files": {relative path: {"size", "sha256"}}} of
    every file of a finalised checkpoint step (atomically: written beside, then renamed)."""
    return files.write_manifest(step_dir)


def verify_step(step_dir: str | pathlib.Path) -> tuple[bool | None, str]:
    """(True, "") when every file matches STEP_DIR's manifest; (False, "FILE: what is wrong") when
    one does not; (None, reason) when there is no manifest to check against."""
    return files.verify_manifest(step_dir)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """config.checkpoint: how often to save and how many steps to keep."""

    save_every: int = 1000  # every N steps (0: only at the end and on SIGTERM/SIGINT)
    keep: int = 3  # the newest K checkpoints are kept
    async_save: bool = True  # write in a background thread


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
        self._async = bool(checkpoint_config.async_save)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(max(int(checkpoint_config.keep), 1)),
            enable_async_checkpointing=bool(checkpoint_config.async_save),
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)
        self._is_primary = jax.process_index() == 0
        self._unmanifested: list[int] = []  # saved by this process, manifest not yet scheduled
        self._hashing: list[concurrent.futures.Future] = []
        self._hasher: concurrent.futures.ThreadPoolExecutor | None = None
        self._intact: set[int] = set()  # verified, or saved by this process
        self._corrupt: dict[int, str] = {}  # step -> what is wrong
        self._warned: set[int] = set()
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
        # numpy: process-local data (a jax array made under the mesh context would be a global one).
        return bool(np.asarray(multihost_utils.process_allgather(np.asarray(local))).any())

    @property
    def signal_number(self) -> int | None:
        return self._signal_seen

    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(int(step))

    def _check(self, step: int) -> tuple[bool | None, str]:
        """verify_step with a per-process cache; steps this process saved count as intact."""
        if step in self._intact:
            return True, ""
        if step in self._corrupt:
            return False, self._corrupt[step]
        intact, problem = verify_step(self.step_dir(step))
        if intact is False:
            self._corrupt[step] = problem
        elif intact:
            self._intact.add(step)
        return intact, problem

    def _newest_intact(self) -> int | None:
        """The newest step whose files match its manifest (or that has none); None when there are
        no steps. Each corrupted step is logged once; none intact -> CheckpointCorruptError."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        bad: list[tuple[int, str]] = []
        for step in steps:
            intact, problem = self._check(step)
            if intact is False:
                bad.append((step, problem))
                continue
            if intact is None and step not in self._warned:
                self._warned.add(step)
                logging.info("checkpoint step %d in %s is not verified (%s)", step, self.directory, problem)
            for bad_step, bad_problem in bad:
                if bad_step not in self._warned:
                    self._warned.add(bad_step)
                    logging.warning(
                        "checkpoint step %d in %s is corrupted: %s; using step %d instead",
                        bad_step, self.directory, bad_problem, step,
                    )
            return step
        if bad:
            raise CheckpointCorruptError(
                f"no intact checkpoint in {self.directory}: "
                + "; ".join(f"step {s}: {p}" for s, p in bad)
                + ". Move the directory away to train from scratch"
            )
        return None

    def latest_step(self) -> int | None:
        """The newest complete and intact checkpoint step, or None (see the module docstring)."""
        if jax.process_count() == 1:
            return self._newest_intact()
        from jax.experimental import multihost_utils

        # Process 0 reads and hashes; every host resumes from the step it chose.
        code, error = -1, None
        if self._is_primary:
            try:
                step = self._newest_intact()
                code = -1 if step is None else step
            except CheckpointCorruptError as e:
                code, error = -2, e
        code = int(multihost_utils.broadcast_one_to_all(np.int64(code)))
        if code == -2:
            raise error or CheckpointCorruptError(f"no intact checkpoint in {self.directory} (see process 0's log)")
        return None if code == -1 else code

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True every `save_every` updates (0 disables periodic saves)."""
        return self.save_every > 0 and step > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, data_state: dict | None = None) -> None:
        """Starts saving `state` and the JSON `data_state` as step `step` (async if configured)."""
        step = int(step)
        if step in self.manager.all_steps():
            replace = step in self._corrupt  # known on process 0, which verifies
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                replace = bool(multihost_utils.broadcast_one_to_all(np.int32(replace)))
            if not replace:
                return
            logging.warning("replacing corrupted checkpoint step %d in %s", step, self.directory)
            self.manager.delete(step)
            self._corrupt.pop(step, None)
        self.manager.wait_until_finished()  # what manager.save does first anyway
        self._schedule_manifests()
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state or {}),
            ),
            force=True,
        )
        self._intact.add(step)
        if self._is_primary:
            self._unmanifested.append(step)
        if not self._async:
            self._schedule_manifests()  # a synchronous save is finalised when save() returns

    def _schedule_manifests(self) -> None:
        """Starts hashing the finalised steps saved by this process (call after the save finished)."""
        if not self._unmanifested:
            return
        if self._hasher is None:
            self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-manifest")
        for step in self._unmanifested:
            self._hashing.append(self._hasher.submit(self._write_manifest, step))
        self._unmanifested = []

    def _write_manifest(self, step: int) -> None:
        step_dir = self.step_dir(step)
        try:
            write_manifest(step_dir)
        except FileNotFoundError:
            if step_dir.exists():  # else: removed by keep-last-K meanwhile
                raise

    def _finish_manifests(self) -> None:
        """Waits for every scheduled manifest; a failure to write one is logged, not fatal."""
        futures, self._hashing = self._hashing, []
        for future in futures:
            try:
                future.result()
            except OSError as error:
                logging.warning("could not write a checkpoint manifest in %s: %s", self.directory, error)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """Restores (state, data_state) of `step` (None = latest) into `abstract_state`'s shardings.

        abstract_state: pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` (see
        `jaxalign.parallel.mesh.with_shardings`) with the structure of the saved state.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        if jax.process_count() == 1 or self._is_primary:
            intact, problem = self._check(step)
            if intact is False:
                raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} is corrupted: {problem}")
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
            )
        except Exception as error:  # noqa: BLE001 - one line naming the step; the cause stays chained
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            raise CheckpointError(
                f"could not restore checkpoint step {step} from {self.directory}: {type(error).__name__}: {first_line}"
            ) from error
        return restored["state"], dict(restored["data"] or {})

    def wait(self) -> None:
        """Blocks until pending async saves are on disk and their manifests are written.

        After SIGTERM/SIGINT the last manifests are skipped (hashing a large state could outlast
        the preemption grace period): those steps are then used unverified."""
        self.manager.wait_until_finished()
        if self._signal_seen is None:
            self._schedule_manifests()
        self._finish_manifests()

    def close(self) -> None:
        """Waits for pending saves (and manifests) and restores the previous signal handlers."""
        self.wait()
        self.manager.close()
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
