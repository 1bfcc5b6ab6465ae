"""The one training loop: supervised stages (SFT, reward, cost) and RL stages run through `run`.

A stage supplies a host-level step and the state around it:

    result = loop.run(
        settings=LoopSettings(num_steps=..., log_every=10, eval_every=0, checkpoint=...),
        workdir=workdir, mesh=mesh, rules=rules,
        step_fn=step_fn,              # (state, batch, frozen) -> (state, metrics): one update / one RL iteration
        abstract_state=abstract,      # ShapeDtypeStructs with shardings (restore target)
        init_state=init_state,        # () -> the step-0 state (random init or HF load); only on a fresh run
        batches=batches,              # iterator with get_state()/set_state() (JSON)
        frozen=frozen,                # sharded params of frozen roles (reference, reward, cost, ...):
                                      # passed to every step and eval, never donated, never checkpointed
        eval_fn=eval_fn)              # (state, frozen) -> {name: float}, optional

`train` wraps `run` for supervised stages: it compiles the gradient-accumulation update of a
`loss_fn` (see `make_train_step`) and groups the micro-batches.

What `run` does, in order:
  * restores WORKDIR/checkpoints/<latest> (state + iterator state) if present, else init_state();
    WORKDIR/metrics.jsonl is cut back to the restored step, so a resumed run logs exactly what an
    uninterrupted one would; a run already at num_steps trains nothing ("already finished");
  * per step: step_fn, then every metric must be finite: a NaN/inf (loss, gradient or parameter
    norm, reward, ...) writes that step's metrics and raises `NonFiniteError` without saving, so
    the newest checkpoint is the last good one (parameter norms are measured after the update,
    so a poisoned update is never saved); likewise a step whose `num_loss_tokens` metric is 0
    (no target token: its loss is -0 and it trains nothing) raises `NoTargetTokensError`;
  * logs metrics every `log_every` steps (and the last) to metrics.jsonl and TensorBoard, with a
    tqdm bar; evaluates every `eval_every` steps;
  * saves every `checkpoint.save_every` steps, at the end and on SIGTERM/SIGINT (then raises
    `Preempted`); the final evaluation runs after the final save, so a failing evaluation never
    loses training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import optax
import tqdm

from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import checkpoint as checkpoint_lib
from jaxalign.train import metrics as metrics_lib
from jaxalign.train.state import TrainState, shardings_of

# (params, batch, rng, extra[, frozen]) -> (loss, (metrics, extra))
LossFn = Callable[..., tuple[jax.Array, tuple[dict, Any]]]
StepFn = Callable[[Any, Any, Any], tuple[Any, dict]]
EvalFn = Callable[[Any, Any], dict]


class NonFiniteError(RuntimeError):
    """A metric (loss, gradient norm, reward, ...) became NaN/inf; the run stopped without saving."""


NonFiniteLossError = NonFiniteError  # the name the supervised stages have always raised


class NoTargetTokensError(ValueError):
    """An update had no target token (metric num_loss_tokens = 0: every response was cut away); the
    run stopped without saving it."""


class Preempted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint of the last completed step was saved."""

    def __init__(self, step: int, signum: int | None):
        super().__init__(f"stopped by signal {signum} after step {step}; checkpoint saved, rerun the same command to resume")
        self.step = step
        self.signum = signum


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How long to run and how often to log, evaluate and save."""

    num_steps: int
    checkpoint: checkpoint_lib.CheckpointSettings = checkpoint_lib.CheckpointSettings()
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end (when there is an eval_fn)
    grad_accum_steps: int = 1  # micro-batches per update (supervised stages)
    desc: str = "train"  # progress-bar label

    def __post_init__(self):
        if self.num_steps < 0:
            raise ValueError(f"config.train.num_steps must be >= 0 after resolution, got {self.num_steps}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"config.train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int  # the step the run ended at
    trained_steps: int  # steps taken by this invocation (0: already finished)


def resolve_num_steps(num_steps: int, epochs: int, batches_per_epoch: int | None, grad_accum_steps: int = 1) -> int:
    """num_steps, or epochs * ceil(batches_per_epoch / grad_accum_steps) when num_steps is -1."""
    if num_steps > 0:
        return int(num_steps)
    if not batches_per_epoch:
        raise ValueError("config.train.num_steps is -1 but the epoch has no full batch (too few examples for "
                         "config.data.batch_size); set num_steps or lower batch_size")
    return int(epochs) * math.ceil(batches_per_epoch / int(grad_accum_steps))


# ------------------------------------------------------------------------------------ supervised update


def count_tokens(batch: dict) -> jax.Array:
    """Real tokens in a batch: the sum of every `*attention_mask` entry."""
    total = jnp.zeros((), jnp.int32)
    for key, value in batch.items():
        if key.endswith("attention_mask"):
            total = total + jnp.sum(value.astype(jnp.int32))
    return total


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    grad_accum_steps: int,
    schedule: optax.Schedule | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """A pure update: (state, [micro_batch] * grad_accum_steps[, frozen]) -> (state, metrics). Not jitted.

    Gradients are the mean over micro-batches of grad(loss) (DeepSpeed GAS semantics); metrics
    are micro-batch means, plus grad_norm (before clipping), param_norm (after the update),
    learning_rate and tokens. With `frozen`, loss_fn is called as loss_fn(params, batch, rng, extra, frozen).
    """

    def step(state: TrainState, micro_batches: list[dict], frozen: Any = None) -> tuple[TrainState, dict]:
        if len(micro_batches) != grad_accum_steps:
            raise ValueError(f"expected {grad_accum_steps} micro-batches, got {len(micro_batches)}")
        rng, step_rng = jax.random.split(state.rng)
        frozen_args = () if frozen is None else (frozen,)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro_step(carry, inputs):
            grads_sum, extra = carry
            index, batch = inputs
            (loss, (metrics, extra)), grads = grad_fn(state.params, batch, jax.random.fold_in(step_rng, index), extra,
                                                      *frozen_args)
            grads_sum = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_sum, grads)
            metrics = dict(metrics, loss=loss, tokens=count_tokens(batch))
            return (grads_sum, extra), metrics

        if grad_accum_steps == 1:  # no accumulation buffer, no scan
            batch = micro_batches[0]
            (loss, (metrics, extra)), grads = grad_fn(state.params, batch, jax.random.fold_in(step_rng, 0), state.extra,
                                                      *frozen_args)
            metrics = dict(metrics, loss=loss, tokens=count_tokens(batch))
        else:
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *micro_batches)
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            indices = jnp.arange(grad_accum_steps)
            (grads_sum, extra), metrics = jax.lax.scan(micro_step, (zeros, state.extra), (indices, stacked))
            grads = jax.tree.map(lambda g, p: (g / grad_accum_steps).astype(p.dtype), grads_sum, state.params)
            metrics = jax.tree.map(jnp.mean, metrics)
            metrics["tokens"] = metrics["tokens"] * grad_accum_steps
        metrics["grad_norm"] = optax.tree.norm(grads)
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_state = state.apply_gradients(grads, tx, rng=rng, extra=extra)
        metrics["param_norm"] = optax.tree.norm(new_state.params)
        return new_state, metrics

    return step


def jit_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, grad_accum_steps: int, abstract_state: Any,
                   schedule: optax.Schedule | None = None, frozen_shardings: Any = None) -> Callable:
    """make_train_step jitted with the state's shardings (donated) and the frozen params' shardings:
    the update `train` runs, and the one jaxalign.plan compiles for a TPU slice."""
    shardings = shardings_of(abstract_state)
    return jax.jit(
        make_train_step(loss_fn, tx, grad_accum_steps, schedule),
        in_shardings=(shardings, None, frozen_shardings),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )


class Grouped:
    """Groups an iterator's items into lists of n (the micro-batches of one update); the wrapped
    iterator's get_state()/set_state() pass through."""

    def __init__(self, iterator: Iterator, n: int):
        self.iterator, self.n = iterator, n

    def __iter__(self):
        return self

    def __next__(self) -> list:
        return [next(self.iterator) for _ in range(self.n)]

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state) -> None:
        self.iterator.set_state(state)


def make_eval_fn(
    metrics_fn: Callable[..., dict],
    make_eval_iter: Callable[[], Iterator[dict]],
    num_batches: int,
    mesh: jax.sharding.Mesh,
    rules,
) -> EvalFn:
    """eval_fn(state, frozen) -> {name: mean over batches} from a per-batch `metrics_fn(params, batch,
    extra)`, or `metrics_fn(params, batch, extra, frozen)` when the run has frozen models.

    make_eval_iter() returns a fresh pass over the eval split; num_batches < 0 means all of it.
    """
    jitted = jax.jit(metrics_fn)

    def eval_fn(state: TrainState, frozen: Any = None) -> dict[str, float]:
        frozen_args = () if frozen is None else (frozen,)
        sums: dict[str, float] = {}
        count = 0
        with mesh_lib.sharding_context(mesh, rules):
            for batch in make_eval_iter():
                if 0 <= num_batches <= count:
                    break
                values = jax.device_get(jitted(state.params, batch, state.extra, *frozen_args))
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                count += 1
        return {name: total / max(count, 1) for name, total in sums.items()}

    return eval_fn


def train(
    *,
    settings: LoopSettings,
    workdir: str | pathlib.Path,
    mesh: jax.sharding.Mesh,
    rules,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    abstract_state: TrainState,
    init_state: Callable[[], TrainState],
    train_iter: Iterator[dict],
    eval_fn: EvalFn | None = None,
    schedule: optax.Schedule | None = None,
    frozen: Any = None,
    frozen_shardings: Any = None,
    checkpointer: checkpoint_lib.Checkpointer | None = None,
) -> LoopResult:
    """A supervised stage: `loss_fn` updates with gradient accumulation, run by `run`."""
    with mesh_lib.sharding_context(mesh, rules):
        update = jit_train_step(loss_fn, tx, settings.grad_accum_steps, abstract_state, schedule, frozen_shardings)
    return run(settings=settings, workdir=workdir, mesh=mesh, rules=rules, step_fn=update,
               abstract_state=abstract_state, init_state=init_state,
               batches=Grouped(train_iter, settings.grad_accum_steps), frozen=frozen, eval_fn=eval_fn,
               checkpointer=checkpointer)


# ------------------------------------------------------------------------------------ the loop


def restore_or_init(checkpointer: checkpoint_lib.Checkpointer, abstract_state: Any, init_state: Callable[[], Any],
                    batches: Any = None) -> tuple[Any, int]:
    """(state, step): the latest checkpoint (iterator state restored too) or init_state() at step 0."""
    step = checkpointer.latest_step()
    if step is None:
        state = jax.device_put(init_state(), shardings_of(abstract_state))
        return state, 0
    state, data_state = checkpointer.restore(step, abstract_state)
    if batches is not None and data_state.get("iterator") is not None:
        batches.set_state(data_state["iterator"])
    logging.info("resumed from %s/%d", checkpointer.directory, step)
    return state, step


def _data_state(batches: Any) -> dict:
    get_state = getattr(batches, "get_state", None)
    return {"iterator": get_state() if get_state is not None else None}


def _progress(metrics: dict, elapsed: float) -> dict:
    shown = {}
    for name in ("loss", "reward", "cost", "lambda"):
        if name in metrics:
            shown[name] = f"{float(metrics[name]):.4g}"
    if "tokens" in metrics:
        shown["tok_s"] = f"{float(metrics['tokens']) / max(elapsed, 1e-9):.0f}"
    return shown


def _non_finite(metrics: dict) -> list[str]:
    bad = []
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(number):
            bad.append(f"{name}={number}")
    return bad


def run(
    *,
    settings: LoopSettings,
    workdir: str | pathlib.Path,
    mesh: jax.sharding.Mesh,
    rules,
    step_fn: StepFn,
    abstract_state: Any,
    init_state: Callable[[], Any],
    batches: Iterator,
    frozen: Any = None,
    eval_fn: EvalFn | None = None,
    checkpointer: checkpoint_lib.Checkpointer | None = None,
) -> LoopResult:
    """Runs `step_fn` until `settings.num_steps` (see the module docstring)."""
    workdir = pathlib.Path(workdir)
    own_checkpointer = checkpointer is None
    if own_checkpointer:
        checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", settings.checkpoint)
    writer = metrics_lib.MetricWriter(workdir)
    try:
        with mesh_lib.sharding_context(mesh, rules):
            state, step = restore_or_init(checkpointer, abstract_state, init_state, batches)
            writer.truncate_after(step)
            if step >= settings.num_steps:
                logging.info("already finished: step %d of %d; nothing to train", step, settings.num_steps)
                return LoopResult(state=state, step=step, trained_steps=0)
            start_step = step
            state, step = _run_steps(settings, state, step, step_fn, batches, frozen, eval_fn, checkpointer, writer)
    finally:
        writer.close()
        if own_checkpointer:
            checkpointer.close()
    return LoopResult(state=state, step=step, trained_steps=step - start_step)


def _write_eval(writer, step, results):
    if not results:
        logging.warning("evaluation at step %d returned no metrics (empty eval split?)", step)
        return
    writer.write(step, results, prefix="eval/")


def _run_steps(settings, state, step, step_fn, batches, frozen, eval_fn, checkpointer, writer):
    num_steps = settings.num_steps
    log_every = max(int(settings.log_every), 1)
    bar = tqdm.tqdm(total=num_steps, initial=step, desc=settings.desc, disable=jax.process_index() != 0,
                    dynamic_ncols=True)
    last_saved = checkpointer.latest_step()
    try:
        while step < num_steps:
            try:
                batch = next(batches)
            except StopIteration:
                logging.info("training data exhausted after %d steps", step)
                break
            start = time.perf_counter()
            state, metrics = step_fn(state, batch, frozen)
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - start
            step += 1
            bad = _non_finite(metrics)
            if bad:
                writer.write(step, metrics)
                checkpointer.wait()
                raise NonFiniteError(
                    f"non-finite {', '.join(bad[:6])} at step {step}; stopping without saving. The last "
                    f"good checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}"
                )
            if "num_loss_tokens" in metrics and float(metrics["num_loss_tokens"]) == 0:
                writer.write(step, metrics)
                checkpointer.wait()
                raise NoTargetTokensError(
                    f"step {step} had no target token (num_loss_tokens = 0: the sequence length cut away every "
                    f"response of its batch); stopping without saving. The last good checkpoint is step "
                    f"{checkpointer.latest_step()} in {checkpointer.directory}"
                )
            bar.update(1)
            bar.set_postfix(_progress(metrics, elapsed))
            if step % log_every == 0 or step == num_steps:
                writer.write(step, metrics)
            if eval_fn is not None and settings.eval_every > 0 and step % settings.eval_every == 0 and step != num_steps:
                _write_eval(writer, step, eval_fn(state, frozen))
            if checkpointer.should_save(step) or checkpointer.preempted:
                checkpointer.save(step, state, _data_state(batches))
                last_saved = step
            if checkpointer.preempted:
                checkpointer.wait()
                raise Preempted(step, checkpointer.signal_number)
        if last_saved != step:
            checkpointer.save(step, state, _data_state(batches))
        checkpointer.wait()
        if eval_fn is not None:  # after the final save: a failing evaluation loses no training
            _write_eval(writer, step, eval_fn(state, frozen))
    finally:
        bar.close()
    return state, step
