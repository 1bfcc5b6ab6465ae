"""One RL iteration on the host, as a step of the one training loop (jaxalign.train.loop.run).

    batches = RLBatches(prompt_iter, ptx_iter, ptx_per_iteration)   # checkpointable data state
    step_fn = iteration_step(program, algorithm, settings)          # (state, batch, frozen) -> (state, metrics)
    loop.run(step_fn=step_fn, batches=batches, frozen=frozen, ...)

An iteration: generate -> score -> the algorithm observes the rollout's scores (PPO-Lagrangian
pushes the costs into its window) -> for each PPO epoch and minibatch: the algorithm's hook (the
lambda step), then one jitted update -> the adaptive KL controller, if on.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.objectives import ppo
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.rl.algorithms.base import Algorithm
from jaxalign.rl.settings import RLSettings
from jaxalign.rl.steps import RLProgram, RLState


class RLBatches:
    """Yields {"prompt": batch, "ptx": [batch] * ptx_per_iteration or None} per iteration; its
    state is both iterators' states."""

    def __init__(self, prompt_iter: Iterator[dict], ptx_iter: Iterator[dict] | None, ptx_per_iteration: int):
        self.prompt_iter, self.ptx_iter, self.ptx_per_iteration = prompt_iter, ptx_iter, ptx_per_iteration

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        prompt = next(self.prompt_iter)
        ptx = None if self.ptx_iter is None else [next(self.ptx_iter) for _ in range(self.ptx_per_iteration)]
        return {"prompt": prompt, "ptx": ptx}

    def get_state(self) -> dict:
        state = {"prompt": self.prompt_iter.get_state()}
        if self.ptx_iter is not None:
            state["ptx"] = self.ptx_iter.get_state()
        return state

    def set_state(self, state: dict) -> None:
        self.prompt_iter.set_state(state["prompt"])
        if self.ptx_iter is not None:
            self.ptx_iter.set_state(state["ptx"])


def rl_iteration(program: RLProgram, algorithm: Algorithm, settings: RLSettings, frozen: dict, state: RLState,
                 batch: dict) -> tuple[RLState, dict]:
    """One rollout + scoring + PPO epochs over minibatches. -> (state, metrics)."""
    times = {}
    t0 = time.perf_counter()
    rng, sample_rng = jax.random.split(state.rng)
    prompt_ids, prompt_mask = batch["prompt"]["input_ids"], batch["prompt"]["attention_mask"]
    if settings.num_return_sequences > 1:  # k responses per prompt: rows b*k .. b*k+k-1 are prompt b's group
        prompt_ids, prompt_mask = (jnp.repeat(x, settings.num_return_sequences, axis=0)
                                   for x in (prompt_ids, prompt_mask))
    prompt_ids, prompt_mask = jax.device_put((prompt_ids, prompt_mask), program.batch_sharding)
    prompt_length = settings.prompt_length
    if settings.length_bucket:  # drop the left padding columns no prompt uses
        first = int(program.used_columns(prompt_mask)[0])
        prompt_length = settings.bucketed(settings.prompt_length - first, settings.prompt_length)
        prompt_ids, prompt_mask = (program.columns(x, settings.prompt_length - prompt_length, settings.prompt_length)
                                   for x in (prompt_ids, prompt_mask))
    input_ids, attention_mask, sample_log_probs = program.rollout(program.actor_params(state.actor.params, frozen),
                                                                  prompt_ids, prompt_mask,
                                                                  sample_rng)
    if settings.length_bucket:  # and the right padding columns after the longest response
        end = int(program.used_columns(attention_mask)[1])
        response_length = settings.bucketed(end - prompt_length, settings.max_new_tokens)
        input_ids, attention_mask = (program.columns(x, 0, prompt_length + response_length)
                                     for x in (input_ids, attention_mask))
        sample_log_probs = program.columns(sample_log_probs, 0, response_length)
    jax.block_until_ready(attention_mask)
    times["generate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    exp, scores, stats = program.score(frozen, state, input_ids, attention_mask, sample_log_probs,
                                       prompt_length=prompt_length)
    stats = jax.device_get(stats)
    times["score"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # The algorithm observes the whole rollout on every host, so its state (PPO-Lagrangian's cost
    # window) is identical everywhere: a replicated array that Orbax saves from process 0 and every
    # host restores, and a lambda that does not depend on how the devices are split into processes
    # (1 x 8 devices == 2 x 4). The window is thus global: the last W sequence costs of the run.
    # Upstream keeps one window of W per GPU and averages over the N GPUs, which is the same as a
    # global window of W x N when W is a multiple of the per-GPU rollout batch (upstream: 128 and 16):
    # set config.rl.ppo_lag.episode_cost_window_size = 128 x N to reproduce an N-GPU upstream run.
    algorithm_state = algorithm.observe(settings, state.algorithm,
                                        {name: mesh_lib.global_rows(value) for name, value in scores.items()})
    state = state.replace(algorithm=algorithm_state, rng=rng)
    update_metrics, hook_metrics = [], {}
    ptx_batches = iter(batch["ptx"] or [])
    for _ in range(settings.ppo_epochs):
        for index in range(settings.num_minibatches):
            algorithm_state, hook_metrics = algorithm.before_update(settings, state.algorithm, int(state.actor.step))
            state = state.replace(algorithm=algorithm_state)
            mb = exp if settings.num_minibatches == 1 else program.take_minibatch(exp, index)
            ptx_batch = None
            if settings.ptx_coeff > 0:
                ptx_batch = trim_ptx(program, settings, jax.device_put(next(ptx_batches), program.ptx_shardings))
            state, metrics = program.train(state, mb, algorithm.multiplier(settings, state.algorithm), ptx_batch,
                                           frozen, prompt_length=prompt_length)
            update_metrics.append(metrics)
    update_metrics = jax.device_get(update_metrics)
    times["train"] = time.perf_counter() - t0

    kl_coeff = float(state.kl_coeff)
    if settings.adaptive_kl:
        kl_coeff = float(ppo.adaptive_kl_coeff(state.kl_coeff, stats["kl_divergence"], settings.target_kl,
                                               settings.kl_horizon, int(input_ids.shape[0])))
    state = state.replace(kl_coeff=jnp.asarray(kl_coeff, jnp.float32), iteration=state.iteration + 1)

    metrics = {name: float(value) for name, value in stats.items()}
    for name in update_metrics[-1]:
        metrics[name] = float(np.mean([m[name] for m in update_metrics]))
    if settings.old_log_probs == "sampler":
        check_sampler_log_probs(settings, update_metrics[0], int(state.iteration))
        metrics.update({name: float(update_metrics[0][name]) for name in ("logprob_gap_max", "logprob_gap_mean")})
    metrics.update({name: float(value) for name, value in hook_metrics.items()})
    # a scalar lambda (ppo_lag), nu or 0; multi_lag: sum_i lambda_i (each one is logged as lambda/<name>)
    metrics["lambda"] = float(np.sum(algorithm.multiplier(settings, state.algorithm)))
    metrics["kl_coeff"] = kl_coeff
    batch_size, length = input_ids.shape
    total = sum(times.values())
    metrics.update({f"time/{name}_s": value for name, value in times.items()})
    metrics["time/iteration_s"] = total
    metrics["generate_tokens_per_s"] = batch_size * stats["mean_generated_length"] / max(times["generate"], 1e-9)
    metrics["tokens_per_s"] = batch_size * length / max(total, 1e-9)
    metrics["sequence_length"] = length  # prompt_length + max_new_tokens, or less with rl.length_bucket
    return state, metrics


def check_sampler_log_probs(settings: RLSettings, first_update: dict, iteration: int) -> None:
    """With rl.old_log_probs "sampler": ValueError when the first update of the iteration (the rollout's
    params, so its log-probs are the recomputed old log-probs) saw a max |sampler - actor| log-prob gap
    above rl.max_logprob_gap. The iteration's state is discarded (the loop saves nothing of it)."""
    gap = float(first_update["logprob_gap_max"])
    if not gap <= settings.max_logprob_gap:
        raise ValueError(f"config.rl.old_log_probs='sampler': at iteration {iteration} the sampler's log-probs differ "
                         f"from the actor's by up to {gap:.3g} > config.rl.max_logprob_gap={settings.max_logprob_gap:g} "
                         f"(sampling and training see different numerics, e.g. a bf16 or int8 decode layout): use "
                         f"config.rl.old_log_probs='recompute' or raise the bound")


def trim_ptx(program: RLProgram, settings: RLSettings, ptx_batch: dict) -> dict:
    """The PTX batch without the right padding columns no row uses (rl.length_bucket > 0)."""
    if not settings.length_bucket:
        return ptx_batch
    length = ptx_batch["attention_mask"].shape[1]
    keep = settings.bucketed(int(program.used_columns(ptx_batch["attention_mask"])[1]), length)
    return {key: program.columns(value, 0, keep) for key, value in ptx_batch.items()}


def iteration_step(program: RLProgram, algorithm: Algorithm, settings: RLSettings):
    """The loop's step_fn: (state, {"prompt", "ptx"}, frozen) -> (state, metrics)."""

    def step(state: RLState, batch: dict, frozen: dict) -> tuple[RLState, dict]:
        return rl_iteration(program, algorithm, settings, frozen, state, batch)

    return step
