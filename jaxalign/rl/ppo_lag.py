"""The PPO / PPO-Lagrangian / reward-shaping loop over six roles (spec §5).

One iteration (DESIGN.md "Data flow of one PPO-Lagrangian iteration"):

    generate   jit: actor samples responses to a left-padded prompt batch
    score      jit: actor + reference log-probs, reward/cost end scores, critic values,
                    KL-shaped rewards/costs, GAE per stream -> Experience
    lambda     host: push the batch's costs into the window, J_C = cross-process mean of the
                    window mean, SGD step on log_lambda (after the delay, capped)
    train      jit: PPO-clip actor update on A = (A_R - lambda*A_C)/(1+lambda) plus PTX
                    (one AdamW update on 0.5*(g_RL + ptx_coeff*g_PTX)), clipped value updates
                    of both critics

`ppo` and `ppo_reward_shaping` are the same loop with one critic (RLSettings.algorithm).
`run(config, workdir)` is the `jaxalign train` entry point for those stages.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxalign.objectives import lagrange as lagrange_lib
from jaxalign.objectives import ppo
from jaxalign.objectives import sft
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.rl import roles
from jaxalign.rl.roles import RoleFns
from jaxalign.rl.rollout import Experience, critic_values, policy_log_probs, score_experience
from jaxalign.rl.settings import RLSettings
from jaxalign.train import checkpoint as checkpoint_lib
from jaxalign.train import loop, optim
from jaxalign.train import metrics as metrics_lib
from jaxalign.train.state import TrainState


@flax.struct.dataclass
class RLState:
    """Everything that changes during an RL run, as one checkpointable pytree."""

    actor: TrainState
    reward_critic: TrainState
    cost_critic: TrainState | None  # None unless ppo_lag
    lagrange: lagrange_lib.LagrangeState
    kl_coeff: jax.Array  # [] beta (changes only with the adaptive KL controller)
    rng: jax.Array  # raw PRNG key: split once per iteration for sampling
    iteration: jax.Array  # [] int32 rollouts done


@dataclasses.dataclass(frozen=True)
class Optimizers:
    """Actor and critic optimizers with their schedules (for logging the learning rates)."""

    actor: optax.GradientTransformation
    critic: optax.GradientTransformation
    actor_schedule: optax.Schedule
    critic_schedule: optax.Schedule


def init_rl_state(settings: RLSettings, params: dict, optimizers: Optimizers, rng: jax.Array) -> RLState:
    """Step-0 state: trainable roles wrap params["actor"/"reward_critic"/"cost_critic"].

    The train step donates the state, so these params must not share buffers with each other
    or with the frozen roles (load or copy each role separately).
    """
    actor_rng, reward_rng, cost_rng, sample_rng = jax.random.split(rng, 4)
    cost_critic = None
    if settings.use_cost_critic:
        cost_critic = TrainState.create(params["cost_critic"], optimizers.critic, cost_rng)
    return RLState(
        actor=TrainState.create(params["actor"], optimizers.actor, actor_rng),
        reward_critic=TrainState.create(params["reward_critic"], optimizers.critic, reward_rng),
        cost_critic=cost_critic,
        lagrange=lagrange_lib.init_lagrange(settings.lambda_init, settings.episode_cost_window_size),
        kl_coeff=jnp.asarray(settings.kl_coeff, jnp.float32),
        rng=sample_rng,
        iteration=jnp.zeros((), jnp.int32),
    )


# ------------------------------------------------------------------------------------ losses


def ptx_loss(fns: RoleFns, params: Any, batch: dict) -> jax.Array:
    """SFT loss of the actor on a PTX batch (an "sft" batch: input_ids, attention_mask, loss_mask [B,L])."""
    logits = fns.policy(params, batch["input_ids"], batch["attention_mask"])
    return sft.sft_loss(logits, batch["input_ids"], batch["loss_mask"])[0]


def actor_advantages(settings: RLSettings, exp: Experience, lagrange_multiplier: jax.Array) -> jax.Array:
    """A_R, or (A_R - lambda*A_C)/(1+lambda) for ppo_lag; whitened if configured. [B,R]."""
    advantages = exp.reward_advantages
    if settings.use_cost_critic:
        advantages = ppo.combined_advantages(exp.reward_advantages, exp.cost_advantages, lagrange_multiplier)
    if settings.whiten_advantages:
        advantages = ppo.whiten(advantages, exp.response_mask)
    return advantages


def actor_rl_loss(fns: RoleFns, settings: RLSettings, params: Any, exp: Experience,
                  advantages: jax.Array) -> jax.Array:
    """PPO-clip loss of the actor on one experience batch. -> []."""
    log_probs = policy_log_probs(fns, params, exp.input_ids, exp.attention_mask, settings.start)
    return ppo.actor_loss(log_probs, exp.old_log_probs, advantages, exp.response_mask, settings.clip_range_ratio)


def value_loss(score_fn, settings: RLSettings, params: Any, exp: Experience, old_values: jax.Array,
               returns: jax.Array) -> jax.Array:
    """Clipped value loss of one critic. -> []."""
    values = critic_values(score_fn, params, exp.input_ids, exp.attention_mask, settings.start)
    return ppo.critic_loss(values, old_values, returns, exp.response_mask, settings.clip_range_value)


# ------------------------------------------------------------------------------------ steps


def score_step(fns: RoleFns, settings: RLSettings, frozen: dict, state: RLState, input_ids: jax.Array,
               attention_mask: jax.Array) -> tuple[Experience, jax.Array, dict]:
    """Experience of a rollout batch. -> (experience, costs [B], batch-mean stats {name: []})."""
    params = dict(frozen, actor=state.actor.params, reward_critic=state.reward_critic.params)
    if state.cost_critic is not None:
        params["cost_critic"] = state.cost_critic.params
    exp, stats = score_experience(fns, settings, params, state.kl_coeff, input_ids, attention_mask)
    means = {name: jnp.mean(value) for name, value in stats.items()}
    means["mean_generated_length"] = means.pop("generated_length")
    means["max_generated_length"] = jnp.max(stats["generated_length"])
    return exp, stats["cost"], means


def train_step(fns: RoleFns, settings: RLSettings, optimizers: Optimizers, state: RLState, exp: Experience,
               lagrange_multiplier: jax.Array, ptx_batch: dict | None) -> tuple[RLState, dict]:
    """One actor update (RL + PTX) and one update of each critic on an experience batch."""
    advantages = actor_advantages(settings, exp, lagrange_multiplier)
    actor_loss, grads = jax.value_and_grad(actor_rl_loss, argnums=2)(fns, settings, state.actor.params, exp, advantages)
    metrics = {"actor_loss": actor_loss, "actor_learning_rate": optimizers.actor_schedule(state.actor.step)}
    if settings.ptx_coeff > 0:
        loss, ptx_grads = jax.value_and_grad(ptx_loss, argnums=1)(fns, state.actor.params, ptx_batch)
        # Upstream doubles GAS when PTX is on: one update on the mean of the two backward passes.
        grads = jax.tree.map(lambda g, p: 0.5 * (g + settings.ptx_coeff * p), grads, ptx_grads)
        metrics["ptx_loss"] = loss
    metrics["actor_grad_norm"] = optax.tree.norm(grads)
    actor = state.actor.apply_gradients(grads, optimizers.actor)

    def critic_update(critic: TrainState, score_fn, old_values, returns):
        loss, critic_grads = jax.value_and_grad(value_loss, argnums=2)(score_fn, settings, critic.params, exp,
                                                                        old_values, returns)
        return critic.apply_gradients(critic_grads, optimizers.critic), loss

    reward_critic, metrics["reward_critic_loss"] = critic_update(
        state.reward_critic, fns.reward_critic, exp.reward_values, exp.reward_returns)
    cost_critic = state.cost_critic
    if cost_critic is not None:
        cost_critic, metrics["cost_critic_loss"] = critic_update(
            cost_critic, fns.cost_critic, exp.cost_values, exp.cost_returns)
    metrics["critic_learning_rate"] = optimizers.critic_schedule(state.reward_critic.step)
    return state.replace(actor=actor, reward_critic=reward_critic, cost_critic=cost_critic), metrics


def minibatch(exp: Experience, index: int, num_minibatches: int) -> Experience:
    """The index-th of num_minibatches equal slices of the batch axis."""
    size = exp.input_ids.shape[0] // num_minibatches
    return jax.tree.map(lambda x: x[index * size:(index + 1) * size], exp)


# ------------------------------------------------------------------------------------ compiled program


@dataclasses.dataclass
class RLProgram:
    """The jitted steps of one configuration, with explicit shardings."""

    generate: Callable
    score: Callable
    train: Callable
    take_minibatch: Callable
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: Any
    ptx_shardings: Any


def experience_shardings(mesh: jax.sharding.Mesh) -> Experience:
    """Every Experience field sharded on the batch axis."""
    two_d = mesh_lib.batch_sharding(mesh, 2)
    return Experience(**{field.name: two_d for field in dataclasses.fields(Experience)})


def rl_state_shardings(state: RLState, param_shardings: dict, optimizers: Optimizers, mesh) -> RLState:
    """Shardings of an RLState: each TrainState's moments follow its params; the rest replicated."""
    rep = mesh_lib.replicated(mesh)

    def train_state(ts: TrainState, params_sharding, tx):
        return mesh_lib.state_shardings(ts, params_sharding, tx, mesh)

    cost_critic = None
    if state.cost_critic is not None:
        cost_critic = train_state(state.cost_critic, param_shardings["cost_critic"], optimizers.critic)
    return RLState(
        actor=train_state(state.actor, param_shardings["actor"], optimizers.actor),
        reward_critic=train_state(state.reward_critic, param_shardings["reward_critic"], optimizers.critic),
        cost_critic=cost_critic,
        lagrange=jax.tree.map(lambda _: rep, state.lagrange),
        kl_coeff=rep,
        rng=rep,
        iteration=rep,
    )


def compile_program(fns: RoleFns, settings: RLSettings, optimizers: Optimizers, mesh, abstract_state: RLState,
                    param_shardings: dict, frozen_shardings: dict, ptx_shardings: Any = None) -> RLProgram:
    """jit the three steps with batch-sharded activations and per-role parameter shardings.

    abstract_state: an RLState of arrays or ShapeDtypeStructs (only its structure is used).
    ptx_shardings: shardings of the PTX batch dict (None when ptx_coeff is 0).
    """
    state_sh = rl_state_shardings(abstract_state, param_shardings, optimizers, mesh)
    rep = mesh_lib.replicated(mesh)
    batch2 = mesh_lib.batch_sharding(mesh, 2)
    batch1 = mesh_lib.batch_sharding(mesh, 1)
    exp_sh = experience_shardings(mesh)
    generate = jax.jit(
        fns.generate,
        in_shardings=(param_shardings["actor"], batch2, batch2, rep),
        out_shardings=(batch2, batch2),
    )
    score = jax.jit(
        lambda frozen, state, ids, mask: score_step(fns, settings, frozen, state, ids, mask),
        in_shardings=(frozen_shardings, state_sh, batch2, batch2),
        out_shardings=(exp_sh, batch1, rep),
    )
    train = jax.jit(
        lambda state, exp, lam, ptx: train_step(fns, settings, optimizers, state, exp, lam, ptx),
        in_shardings=(state_sh, exp_sh, rep, ptx_shardings),
        out_shardings=(state_sh, rep),
        donate_argnums=0,
    )
    take_minibatch = jax.jit(
        lambda exp, index: minibatch(exp, index, settings.num_minibatches),
        static_argnums=1,
        in_shardings=(exp_sh,),
        out_shardings=exp_sh,
    )
    return RLProgram(generate=generate, score=score, train=train, take_minibatch=take_minibatch,
                     state_shardings=state_sh, frozen_shardings=frozen_shardings, batch_sharding=batch2,
                     ptx_shardings=ptx_shardings)


# ------------------------------------------------------------------------------------ host loop


def process_local_rows(x: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded [B] array held by this process, in order, without repeats."""
    shards = {}
    for shard in x.addressable_shards:
        shards.setdefault(shard.index[0].start or 0, shard)
    return np.concatenate([np.asarray(shards[key].data) for key in sorted(shards)])


# The host-side lambda bookkeeping, compiled once (eager jnp would compile op by op).
_push_costs = jax.jit(lagrange_lib.push_costs)
_window_mean = jax.jit(lagrange_lib.window_mean)
_update_lagrange = jax.jit(lagrange_lib.update_lagrange,
                           static_argnames=("threshold", "lambda_lr", "lambda_max", "delay_steps"))


def episode_cost_of(lagrange: lagrange_lib.LagrangeState) -> float:
    """J_C: the window mean of this process, averaged over processes."""
    return lagrange_lib.cross_process_mean(_window_mean(lagrange))


def lagrange_update(settings: RLSettings, lagrange: lagrange_lib.LagrangeState,
                    step: int) -> tuple[lagrange_lib.LagrangeState, float]:
    """lambda step from the cross-process mean of the window (spec §5.8). -> (state, J_C)."""
    episode_cost = episode_cost_of(lagrange)
    lagrange = _update_lagrange(
        lagrange, episode_cost, step, threshold=settings.threshold, lambda_lr=settings.lambda_lr,
        lambda_max=settings.lambda_max, delay_steps=settings.lambda_update_delay_steps)
    return lagrange, episode_cost


def current_lambda(settings: RLSettings, state: RLState) -> jax.Array:
    """lambda of ppo_lag, or the constant nu = lambda_init of reward shaping (unused by ppo). []."""
    if settings.algorithm == "ppo_lag":
        return lagrange_lib.lagrange_multiplier(state.lagrange)
    return jnp.asarray(settings.lambda_init, jnp.float32)


def rl_iteration(program: RLProgram, settings: RLSettings, frozen: dict, state: RLState, prompt_batch: dict,
                 ptx_iter: Iterator[dict] | None) -> tuple[RLState, dict]:
    """One rollout + scoring + PPO epochs over minibatches. -> (state, metrics)."""
    times = {}
    t0 = time.perf_counter()
    rng, sample_rng = jax.random.split(state.rng)
    prompt_ids, prompt_mask = jax.device_put((prompt_batch["input_ids"], prompt_batch["attention_mask"]),
                                             program.batch_sharding)
    input_ids, attention_mask = program.generate(state.actor.params, prompt_ids, prompt_mask, sample_rng)
    jax.block_until_ready(attention_mask)
    times["generate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    exp, costs, stats = program.score(frozen, state, input_ids, attention_mask)
    stats = jax.device_get(stats)
    times["score"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # Ring buffer holds the current batch before any lambda step (spec §5.8).
    lagrange = _push_costs(state.lagrange, process_local_rows(costs))
    state = state.replace(lagrange=lagrange, rng=rng)
    update_metrics = []
    episode_cost = episode_cost_of(lagrange)
    for _ in range(settings.ppo_epochs):
        for index in range(settings.num_minibatches):
            if settings.algorithm == "ppo_lag":
                lagrange, episode_cost = lagrange_update(settings, state.lagrange, int(state.actor.step))
                state = state.replace(lagrange=lagrange)
            mb = exp if settings.num_minibatches == 1 else program.take_minibatch(exp, index)
            ptx_batch = None
            if settings.ptx_coeff > 0:
                ptx_batch = jax.device_put(next(ptx_iter), program.ptx_shardings)
            state, metrics = program.train(state, mb, current_lambda(settings, state), ptx_batch)
            update_metrics.append(metrics)
    update_metrics = jax.device_get(update_metrics)
    times["train"] = time.perf_counter() - t0

    kl_coeff = float(state.kl_coeff)
    if settings.adaptive_kl:
        batch_size = int(input_ids.shape[0])
        kl_coeff = float(ppo.adaptive_kl_coeff(state.kl_coeff, stats["kl_divergence"], settings.target_kl,
                                               settings.kl_horizon, batch_size))
    state = state.replace(kl_coeff=jnp.asarray(kl_coeff, jnp.float32), iteration=state.iteration + 1)

    metrics = {name: float(value) for name, value in stats.items()}
    for name in update_metrics[-1]:
        metrics[name] = float(np.mean([m[name] for m in update_metrics]))
    metrics["episode_cost"] = float(episode_cost)
    metrics["lambda"] = float(current_lambda(settings, state)) if settings.algorithm != "ppo" else 0.0
    metrics["kl_coeff"] = kl_coeff
    batch_size, length = input_ids.shape
    total = sum(times.values())
    metrics.update({f"time/{name}_s": value for name, value in times.items()})
    metrics["time/iteration_s"] = total
    metrics["generate_tokens_per_s"] = batch_size * stats["mean_generated_length"] / max(times["generate"], 1e-9)
    metrics["tokens_per_s"] = batch_size * length / max(total, 1e-9)
    return state, metrics


def data_state(prompt_iter: Any, ptx_iter: Any) -> dict:
    """JSON state of the prompt and PTX iterators for the checkpoint."""
    state = {"prompt": prompt_iter.get_state()}
    if ptx_iter is not None:
        state["ptx"] = ptx_iter.get_state()
    return state


def train_loop(*, program: RLProgram, settings: RLSettings, frozen: dict, init_state: Callable[[], RLState],
               abstract_state: RLState, prompt_iter: Any, ptx_iter: Any, num_iterations: int,
               workdir: str | pathlib.Path, checkpoint_config, mesh, rules,
               log: Callable[[str], None] = logging.info) -> RLState:
    """Runs iterations until `num_iterations`, resuming from WORKDIR/checkpoints exactly.

    Metrics go to WORKDIR/metrics.jsonl (one record per iteration, step = iteration). A
    checkpoint is saved every `checkpoint_config.save_every` iterations, at the end and on
    SIGTERM/SIGINT.
    """
    workdir = pathlib.Path(workdir)
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", checkpoint_config)
    writer = metrics_lib.MetricWriter(workdir)
    try:
        with mesh_lib.sharding_context(mesh, rules):
            step = checkpointer.latest_step()
            if step is None:
                # Committed to the program's shardings up front, so the first call compiles once.
                state, step = jax.device_put(init_state(), program.state_shardings), 0
            else:
                target = mesh_lib.with_shardings(abstract_state, program.state_shardings)
                state, restored = checkpointer.restore(step, target)
                prompt_iter.set_state(restored["prompt"])
                if ptx_iter is not None:
                    ptx_iter.set_state(restored["ptx"])
                log(f"resumed from {checkpointer.directory}/{step}")
            frozen = jax.device_put(frozen, program.frozen_shardings)
            writer.truncate_after(step)
            last_saved = checkpointer.latest_step()
            while step < num_iterations:
                try:
                    prompt_batch = next(prompt_iter)
                except StopIteration:
                    log(f"prompts exhausted after {step} iterations")
                    break
                state, metrics = rl_iteration(program, settings, frozen, state, prompt_batch, ptx_iter)
                step += 1
                if not math.isfinite(metrics["actor_loss"]):
                    raise FloatingPointError(f"actor loss is {metrics['actor_loss']} at iteration {step}")
                writer.write(step, metrics)
                log(f"iter {step}: reward {metrics['reward']:.3f} cost {metrics['cost']:.3f} "
                    f"lambda {metrics['lambda']:.3f} kl {metrics['kl_divergence']:.3f} "
                    f"({metrics['time/iteration_s']:.2f}s)")
                if checkpointer.should_save(step) or step == num_iterations or checkpointer.preempted:
                    checkpointer.save(step, state, data_state(prompt_iter, ptx_iter))
                    last_saved = step
                if checkpointer.preempted:
                    checkpointer.wait()
                    raise loop.Preempted(step, checkpointer.signal_number)
            if last_saved != step:
                checkpointer.save(step, state, data_state(prompt_iter, ptx_iter))
    finally:
        writer.close()
        checkpointer.close()
    return state


# ------------------------------------------------------------------------------------ stage entry point


def make_optimizers(config, num_updates: int) -> Optimizers:
    """Actor: config.train (AdamW, cosine + warmup); critics: config.rl.critic_* (constant)."""
    rl = config.rl
    critic_train = ml_collections.ConfigDict(dict(
        learning_rate=rl.critic_learning_rate, lr_schedule=rl.critic_lr_schedule,
        warmup_ratio=rl.critic_warmup_ratio, weight_decay=rl.critic_weight_decay,
        max_grad_norm=config.train.max_grad_norm))
    return Optimizers(
        actor=optim.make_optimizer(config.train, num_updates),
        critic=optim.make_optimizer(critic_train, num_updates),
        actor_schedule=optim.make_schedule(config.train, num_updates),
        critic_schedule=optim.make_schedule(critic_train, num_updates),
    )


def trainable_params(settings: RLSettings, params: dict) -> dict:
    """The params of the trained roles (actor and the critics the algorithm uses)."""
    names = ["actor", "reward_critic"] + (["cost_critic"] if settings.use_cost_critic else [])
    return {name: params[name] for name in names}


def frozen_params(settings: RLSettings, params: dict) -> dict:
    """The params of the frozen roles (reference, reward model, cost model when used)."""
    return {name: params[name] for name in ("reference", "reward", "cost") if name in params}


def load_data(config, settings: RLSettings, tokenizer, mesh) -> tuple[Any, Any, int]:
    """Prompt iterator, PTX iterator (None when ptx_coeff is 0) and prompts per epoch."""
    from jaxalign.data import pipeline, pku_saferlhf, views
    from jaxalign.train import sft_stage

    template = sft_stage.prompt_template(config, tokenizer)
    rows, _ = pku_saferlhf.read_release(config.data.source, config.data.name, config.data.train_split)
    prompts = views.prompt_examples(rows, template=template)
    batch_size = int(config.data.batch_size)
    prompt_iter = pipeline.make_batches(
        "prompt", prompts, tokenizer, batch_size=batch_size, max_length=settings.prompt_length, mesh=mesh,
        seed=config.seed, shuffle=config.data.shuffle, num_epochs=None)
    ptx_iter = None
    if settings.ptx_coeff > 0:
        source = config.rl.ptx_source or config.data.source
        ptx_rows, _ = pku_saferlhf.read_release(source, config.rl.ptx_name, config.data.train_split)
        ptx_examples = views.sft_examples(ptx_rows, template=template)
        ptx_iter = pipeline.make_batches(
            "sft", ptx_examples, tokenizer, batch_size=batch_size // settings.num_minibatches,
            max_length=settings.sequence_length, mesh=mesh, seed=config.seed + 1, shuffle=config.data.shuffle,
            num_epochs=None)
    logging.info("%d prompts (%s), PTX %s", len(prompts), dict(prompts.counts),
                 "off" if ptx_iter is None else f"on ({source})")
    return prompt_iter, ptx_iter, len(prompts)


def run(config, workdir) -> RLState:
    """`jaxalign train` entry for stages ppo / ppo_lag / ppo_reward_shaping: trains, resumes from
    WORKDIR/checkpoints, writes WORKDIR/metrics.jsonl and exports the actor to WORKDIR/export."""
    from jaxalign.models import tokenizer as tokenizer_lib
    from jaxalign.train import sft_stage

    workdir = pathlib.Path(workdir)
    settings = RLSettings.from_config(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = mesh_lib.axis_rules(config.mesh)
    logging.info("mesh: %s; %s", mesh_lib.describe(mesh), settings)
    tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer or config.model.init_path, padding_side="left")
    prompt_iter, ptx_iter, num_prompts = load_data(config, settings, tokenizer, mesh)
    batch_size = int(config.data.batch_size)
    if batch_size % settings.num_minibatches:
        raise ValueError(f"config.data.batch_size {batch_size} is not divisible by rl.num_minibatches")
    num_iterations = (int(config.train.num_steps) if config.train.num_steps > 0
                      else int(config.train.epochs) * (num_prompts // batch_size))
    optimizers = make_optimizers(config, num_iterations * settings.ppo_epochs * settings.num_minibatches)

    fns, params, shardings, actor_cfg = roles.load_roles(config, settings, tokenizer, mesh, rules)
    trained, frozen = trainable_params(settings, params), frozen_params(settings, params)
    rng = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(lambda p: init_rl_state(settings, p, optimizers, rng), trained)
    ptx_shardings = None
    if ptx_iter is not None:
        ptx_shardings = {key: mesh_lib.batch_sharding(mesh, 2) for key in ("input_ids", "attention_mask", "loss_mask")}
    program = compile_program(fns, settings, optimizers, mesh, abstract, shardings,
                              {name: shardings[name] for name in frozen}, ptx_shardings)
    logging.info("%s: %d iterations of %d prompts, %d new tokens", settings.algorithm, num_iterations, batch_size,
                 settings.max_new_tokens)
    state = train_loop(program=program, settings=settings, frozen=frozen,
                       init_state=lambda: init_rl_state(settings, trained, optimizers, rng),
                       abstract_state=abstract, prompt_iter=prompt_iter, ptx_iter=ptx_iter,
                       num_iterations=num_iterations, workdir=workdir, checkpoint_config=config.checkpoint,
                       mesh=mesh, rules=rules)
    out = sft_stage.export(workdir, actor_cfg, state.actor.params, tokenizer)
    logging.info("exported the actor to %s", out)
    return state
