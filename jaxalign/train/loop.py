"""The generic training loop shared by the SFT and score (reward/cost) stages.

A stage supplies four things and calls `train`:

    loss_fn(params, batch, rng, extra) -> (loss, (metrics, extra))
        batch:   one micro-batch dict of global arrays (see docs/architecture.md, "Data batches")
        rng:     a fresh raw PRNG key per micro-batch
        extra:   the TrainState's stage state (e.g. score normalizer stats); return it updated
                 (or unchanged); it is threaded through the micro-batches in order
        metrics: dict of scalar arrays; averaged over the micro-batches of an update
    abstract_state   `jaxalign.train.state.abstract_train_state(...)`: shapes + shardings
    init_state()     builds the step-0 TrainState in those shardings (random init or HF load);
                     called only when no checkpoint exists
    train_iter       iterator of micro-batches with get_state()/set_state() (JSON)

    state = loop.train(
        config=config, workdir=workdir, mesh=mesh, rules=rules, tx=tx,
        loss_fn=loss_fn, abstract_state=abstract, init_state=init_state,
        train_iter=train_iter, num_steps=num_steps,
        eval_fn=loop.make_eval_fn(metrics_fn, make_eval_iter, config.train.eval_batches, mesh, rules),
        schedule=optim.make_schedule(config.train, num_steps))

What `train` does, in order:
  * restores WORKDIR/checkpoints/<latest> (state + iterator state) if present, else init_state();
    WORKDIR/metrics.jsonl is cut back to the restored step, so a resumed run logs exactly what an
    uninterrupted one would;
  * each update pulls `config.train.grad_accum_steps` micro-batches, averages their gradients
    (lax.scan inside one jitted step, state donated) and applies one optimizer update;
  * logs {"step", "loss", <stage metrics>, "grad_norm", "learning_rate", "tokens"} every
    `config.train.log_every` updates to metrics.jsonl and TensorBoard, with a tqdm bar (tokens/s);
  * runs `eval_fn(state) -> dict` every `config.train.eval_every` updates and at the end
    (logged as "eval/<name>");
  * saves every `config.checkpoint.save_every` updates, at the end, and on SIGTERM/SIGINT
    (then raises `Preempted`); stops at `num_steps` or when `train_iter` is exhausted;
  * a NaN/inf loss or gradient norm raises `NonFiniteLossError` without saving, so the last good
    checkpoint stays.

Build the `num_steps` with `resolve_num_steps(config.train, batches_per_epoch)`.
"""

from __future__ import annotations

import logging
import math
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import optax
import tqdm

from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import checkpoint as checkpoint_lib
from jaxalign.train import metrics as metrics_lib
from jaxalign.train.state import TrainState, shardings_of

LossFn = Callable[[Any, dict, jax.Array, Any], tuple[jax.Array, tuple[dict, Any]]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped without saving the bad state."""


class Preempted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint of the last completed update was saved."""

    def __init__(self, step: int, signum: int | None):
        super().__init__(f"stopped by signal {signum} after step {step}; checkpoint saved, rerun the same command to resume")
        self.step = step
        self.signum = signum


def resolve_num_steps(train_config, batches_per_epoch: int | None) -> int:
    """config.train.num_steps, or epochs * ceil(batches_per_epoch / grad_accum_steps) when it is -1."""
    if train_config.num_steps > 0:
        return int(train_config.num_steps)
    if not batches_per_epoch:
        raise ValueError("config.train.num_steps is -1 but the number of batches per epoch is unknown; set num_steps")
    return int(train_config.epochs) * math.ceil(batches_per_epoch / int(train_config.grad_accum_steps))


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
) -> Callable[[TrainState, list[dict]], tuple[TrainState, dict]]:
    """A pure update: (state, [micro_batch] * grad_accum_steps) -> (state, metrics). Not jitted.

    Gradients are the mean over micro-batches of grad(loss) (DeepSpeed GAS semantics); metrics
    are micro-batch means, plus grad_norm (before clipping), learning_rate and tokens.
    """

    def step(state: TrainState, micro_batches: list[dict]) -> tuple[TrainState, dict]:
        if len(micro_batches) != grad_accum_steps:
            raise ValueError(f"expected {grad_accum_steps} micro-batches, got {len(micro_batches)}")
        rng, step_rng = jax.random.split(state.rng)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro_step(carry, inputs):
            grads_sum, extra = carry
            index, batch = inputs
            (loss, (metrics, extra)), grads = grad_fn(state.params, batch, jax.random.fold_in(step_rng, index), extra)
            grads_sum = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_sum, grads)
            metrics = dict(metrics, loss=loss, tokens=count_tokens(batch))
            return (grads_sum, extra), metrics

        if grad_accum_steps == 1:  # no accumulation buffer, no scan
            batch = micro_batches[0]
            (loss, (metrics, extra)), grads = grad_fn(state.params, batch, jax.random.fold_in(step_rng, 0), state.extra)
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
        return new_state, metrics

    return step


def make_eval_fn(
    metrics_fn: Callable[[Any, dict, Any], dict],
    make_eval_iter: Callable[[], Iterable[dict]],
    num_batches: int,
    mesh: jax.sharding.Mesh,
    rules,
) -> Callable[[TrainState], dict[str, float]]:
    """eval_fn(state) -> {name: mean over batches} from a per-batch `metrics_fn(params, batch, extra)`.

    make_eval_iter() returns a fresh pass over the eval split; num_batches < 0 means all of it.
    Stages that need more than batch means (score distributions, ...) write their own eval_fn.
    """
    jitted = jax.jit(metrics_fn)

    def eval_fn(state: TrainState) -> dict[str, float]:
        sums: dict[str, float] = {}
        count = 0
        with mesh_lib.sharding_context(mesh, rules):
            for batch in make_eval_iter():
                if 0 <= num_batches <= count:
                    break
                values = jax.device_get(jitted(state.params, batch, state.extra))
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                count += 1
        return {name: total / max(count, 1) for name, total in sums.items()}

    return eval_fn


def _next_micro_batches(train_iter: Iterator[dict], n: int) -> list[dict] | None:
    batches = []
    for _ in range(n):
        try:
            batches.append(next(train_iter))
        except StopIteration:
            return None
    return batches


def restore_or_init(
    checkpointer: checkpoint_lib.Checkpointer,
    abstract_state: Any,
    init_state: Callable[[], Any],
    train_iter: Any = None,
) -> tuple[Any, int]:
    """(state, step): the latest checkpoint (iterator state restored too) or init_state() at step 0."""
    step = checkpointer.latest_step()
    if step is None:
        return init_state(), 0
    state, data_state = checkpointer.restore(step, abstract_state)
    if train_iter is not None and data_state.get("iterator") is not None:
        train_iter.set_state(data_state["iterator"])
    logging.info("resumed from %s/%d", checkpointer.directory, step)
    return state, step


def _data_state(train_iter: Any) -> dict:
    get_state = getattr(train_iter, "get_state", None)
    return {"iterator": get_state() if get_state is not None else None}


def train(
    *,
    config,
    workdir: str | pathlib.Path,
    mesh: jax.sharding.Mesh,
    rules,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    abstract_state: TrainState,
    init_state: Callable[[], TrainState],
    train_iter: Iterator[dict],
    num_steps: int,
    eval_fn: Callable[[TrainState], dict[str, float]] | None = None,
    schedule: optax.Schedule | None = None,
    checkpointer: checkpoint_lib.Checkpointer | None = None,
) -> TrainState:
    """Trains until `num_steps` updates (see the module docstring); returns the final state."""
    workdir = pathlib.Path(workdir)
    grad_accum = int(config.train.grad_accum_steps)
    own_checkpointer = checkpointer is None
    if own_checkpointer:
        checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", config.checkpoint)
    writer = metrics_lib.MetricWriter(workdir)
    shardings = shardings_of(abstract_state)
    try:
        with mesh_lib.sharding_context(mesh, rules):
            state, step = restore_or_init(checkpointer, abstract_state, init_state, train_iter)
            writer.truncate_after(step)
            train_step = jax.jit(
                make_train_step(loss_fn, tx, grad_accum, schedule),
                in_shardings=(shardings, None),
                out_shardings=(shardings, None),
                donate_argnums=0,
            )
            state = _run_steps(
                config, state, step, num_steps, train_step, train_iter, eval_fn, checkpointer, writer
            )
    finally:
        writer.close()
        if own_checkpointer:
            checkpointer.close()
    return state


def _write_eval(writer, step, results):
    if not results:
        logging.warning("evaluation at step %d returned no metrics (empty eval split?)", step)
        return
    writer.write(step, results, prefix="eval/")


def _run_steps(config, state, step, num_steps, train_step, train_iter, eval_fn, checkpointer, writer):
    log_every = max(int(config.train.log_every), 1)
    eval_every = int(config.train.eval_every)
    grad_accum = int(config.train.grad_accum_steps)
    bar = tqdm.tqdm(total=num_steps, initial=step, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)
    last_saved = checkpointer.latest_step()
    if step >= num_steps:
        logging.info("already at step %d of %d: nothing to do", step, num_steps)
        bar.close()
        return state
    try:
        while step < num_steps:
            micro_batches = _next_micro_batches(train_iter, grad_accum)
            if micro_batches is None:
                logging.info("training data exhausted after %d updates", step)
                break
            start = time.perf_counter()
            state, metrics = train_step(state, micro_batches)
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - start
            step += 1
            loss = float(metrics["loss"])
            grad_norm = float(metrics["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                writer.write(step, metrics)
                checkpointer.wait()
                raise NonFiniteLossError(
                    f"loss is {loss} (grad norm {grad_norm}) at step {step}; stopping without saving. The last "
                    f"good checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}"
                )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{float(metrics['tokens']) / max(elapsed, 1e-9):.0f}")
            if step % log_every == 0 or step == num_steps:
                writer.write(step, metrics)
            if eval_fn is not None and eval_every > 0 and step % eval_every == 0 and step != num_steps:
                _write_eval(writer, step, eval_fn(state))
            if checkpointer.should_save(step):
                checkpointer.save(step, state, _data_state(train_iter))
                last_saved = step
            if checkpointer.preempted:
                if last_saved != step:
                    checkpointer.save(step, state, _data_state(train_iter))
                checkpointer.wait()
                raise Preempted(step, checkpointer.signal_number)
        if eval_fn is not None:
            _write_eval(writer, step, eval_fn(state))
        if last_saved != step:
            checkpointer.save(step, state, _data_state(train_iter))
        checkpointer.wait()
    finally:
        bar.close()
    return state
