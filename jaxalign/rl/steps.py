"""The RL state and the three compiled steps of an iteration, for any algorithm (rl/algorithms).

    rollout    jit: the actor samples responses to a left-padded prompt batch (with the sampler's log-probs)
    score      jit: actor + reference log-probs, the algorithm's scores, critic values and
                    per-stream advantages -> Experience, plus health metrics (sampler vs trainer
                    log-prob gap, non-finite counts)
    train      jit: the algorithm's actor loss (Algorithm.actor_loss; PPO-clip by default) on its
                    advantage plus PTX (one AdamW update on 0.5*(g_RL + ptx_coeff*g_PTX)), then a
                    clipped value update of every critic

With stack_roles, roles of one architecture share one batched computation (rl/stacking.py):
actor + reference and the scorers + critics score as vmapped passes over stacked params, the actor's
RL and PTX rows run as one policy pass when their shapes match, and critics of one module and param
shapes update as one vmapped step. Off by default: on XLA:CPU the separate passes were faster
(experiments/benchmark_rl.py, separate / stacked 0.92-0.95x per iteration at two sizes; the
independent passes run concurrently on the CPU's thread pool, one batched chain does not).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxalign.objectives import ppo, sft
from jaxalign.models import layer_loop, lora
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.rl import stacking
from jaxalign.rl.algorithms.base import Algorithm
from jaxalign.rl.roles import RoleFns
from jaxalign.rl.rollout import Experience, critic_values, policy_log_probs, retokenize, score_experience
from jaxalign.rl.settings import RLSettings
from jaxalign.train.state import TrainState


@flax.struct.dataclass
class RLState:
    """Everything that changes during an RL run, as one checkpointable pytree."""

    actor: TrainState
    critics: dict  # {stream: TrainState}; empty for a critic-free algorithm
    algorithm: Any  # the algorithm's own state (PPO-Lagrangian: the Lagrange state)
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


def init_rl_state(algorithm: Algorithm, settings: RLSettings, params: dict, optimizers: Optimizers,
                  rng: jax.Array) -> RLState:
    """Step-0 state around params["actor"] and params["<stream>_critic"] for each critic.

    The train step donates the state, so these params must not share buffers with each other
    or with the frozen roles (load or copy each role separately).
    """
    actor_rng, critic_rng, _, sample_rng = jax.random.split(rng, 4)
    critics = {stream: TrainState.create(params[f"{stream}_critic"], optimizers.critic,
                                         jax.random.fold_in(critic_rng, index))
               for index, stream in enumerate(algorithm.critics)}
    return RLState(
        actor=TrainState.create(params["actor"], optimizers.actor, actor_rng),
        critics=critics,
        algorithm=algorithm.init_state(settings),
        kl_coeff=jnp.asarray(settings.kl_coeff, jnp.float32),
        rng=sample_rng,
        iteration=jnp.zeros((), jnp.int32),
    )


def trained_roles(algorithm: Algorithm) -> tuple[str, ...]:
    """The roles whose params live in the RLState."""
    return ("actor", *(f"{stream}_critic" for stream in algorithm.critics))


def role_params(fns: RoleFns, role: str, params: Any, frozen: dict | None) -> Any:
    """What a trained role's function takes: its trained params, or for a LoRA role (fns.bases: the
    actor, LoRA critics) lora.Adapted(its frozen base, its adapters [+ a critic's score head])."""
    return lora.Adapted(frozen[fns.bases[role]], params) if role in fns.bases else params


def actor_params(fns: RoleFns, params: Any, frozen: dict | None) -> Any:
    """role_params of the actor (the policy and the sampler)."""
    return role_params(fns, "actor", params, frozen)


def trained_fns(fns: RoleFns, frozen: dict | None) -> RoleFns:
    """fns whose policy and critic score functions take the trained params (a LoRA role: only its
    adapters [+ head], so gradients are taken w.r.t. them alone); the frozen roles are not updated."""
    if not fns.bases:
        return fns

    def paired(role, fn):
        return lambda params, *inputs: fn(role_params(fns, role, params, frozen), *inputs)

    scores = {role: paired(role, fn) if role in fns.bases else fn for role, fn in fns.scores.items()}
    policy, log_probs = fns.policy, fns.log_probs
    if fns.actor_base:
        policy = paired("actor", policy)
        log_probs = None if log_probs is None else paired("actor", log_probs)
    return dataclasses.replace(fns, policy=policy, scores=scores, log_probs=log_probs)


def actor_shardings(fns: RoleFns, param_shardings: dict, frozen_shardings: dict) -> Any:
    """The shardings of actor_params(...)."""
    return actor_params(fns, param_shardings["actor"], frozen_shardings)


# ------------------------------------------------------------------------------------ losses


def ptx_loss(fns: RoleFns, params: Any, batch: dict) -> jax.Array:
    """SFT loss of the actor on a PTX batch (an "sft" batch: input_ids, attention_mask, loss_mask [B,L])."""
    log_probs = policy_log_probs(fns, params, batch["input_ids"], batch["attention_mask"], 0)
    return sft.token_mean_nll(log_probs, batch["loss_mask"])[0]


def actor_advantages(algorithm: Algorithm, settings: RLSettings, exp: Experience,
                     multiplier: jax.Array) -> jax.Array:
    """The algorithm's actor advantage, whitened if configured. [B,R]."""
    advantages = algorithm.actor_advantages(settings, exp.advantages, multiplier)
    if settings.whiten_advantages:
        advantages = ppo.whiten(advantages, exp.response_mask)
    return advantages


def actor_rl_loss(fns: RoleFns, algorithm: Algorithm, settings: RLSettings, params: Any, exp: Experience,
                  advantages: jax.Array) -> jax.Array:
    """The algorithm's actor loss (Algorithm.actor_loss) on one experience batch. -> []."""
    return actor_rl_loss_and_log_probs(fns, algorithm, settings, params, exp, advantages)[0]


def actor_rl_loss_and_log_probs(fns: RoleFns, algorithm: Algorithm, settings: RLSettings, params: Any,
                                exp: Experience, advantages: jax.Array) -> tuple[jax.Array, jax.Array]:
    """actor_rl_loss and the actor's log-probs it read. -> ([], [B,R])."""
    log_probs = policy_log_probs(fns, params, exp.input_ids, exp.attention_mask, settings.start)
    return algorithm.actor_loss(settings, log_probs, exp, advantages), log_probs


def value_loss(score_fn, settings: RLSettings, params: Any, exp: Experience, old_values: jax.Array,
               returns: jax.Array) -> jax.Array:
    """Clipped value loss of one critic. -> []."""
    values = critic_values(score_fn, params, exp.input_ids, exp.attention_mask, settings.start)
    return ppo.critic_loss(values, old_values, returns, exp.response_mask, settings.clip_range_value)


def can_fuse_ptx(exp: Experience, ptx_batch: dict) -> bool:
    """The PTX rows can join the rollout rows in one policy pass: same [B,L] shape (then each
    device's rows interleave without moving data between devices)."""
    return ptx_batch["input_ids"].shape == exp.input_ids.shape


def actor_rl_ptx_loss(fns: RoleFns, algorithm: Algorithm, settings: RLSettings, params: Any, exp: Experience,
                      advantages: jax.Array, ptx_batch: dict) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """0.5*(L_RL + ptx_coeff*L_PTX) from ONE policy pass over the rollout and PTX rows interleaved
    ([B,2,L] -> [2B,L]; both [B,L]), L_RL the algorithm's actor loss. Its gradient is upstream's
    0.5*(g_RL + ptx_coeff*g_PTX) up to fp32 reassociation. -> (loss, (L_RL, L_PTX, RL log-probs [B,R]))."""
    b, length = exp.input_ids.shape
    both = lambda x, y: jnp.stack([x, y.astype(x.dtype)], axis=1).reshape(2 * b, length)  # noqa: E731
    log_probs = policy_log_probs(fns, params, both(exp.input_ids, ptx_batch["input_ids"]),
                                 both(exp.attention_mask, ptx_batch["attention_mask"]), 0)
    log_probs = log_probs.reshape(b, 2, length - 1)
    rl_log_probs = log_probs[:, 0, settings.start:]
    rl = algorithm.actor_loss(settings, rl_log_probs, exp, advantages)
    ptx = sft.token_mean_nll(log_probs[:, 1], ptx_batch["loss_mask"])[0]
    return 0.5 * (rl + settings.ptx_coeff * ptx), (rl, ptx, rl_log_probs)


# ------------------------------------------------------------------------------------ steps


def health_metrics(exp: Experience, scores: dict, sample_log_probs: jax.Array | None) -> dict:
    """Per-iteration health of a rollout. -> {name: []}.

    logprob_gap_max / logprob_gap_mean: the largest and mean |sampler log-prob - trainer's recomputed
    old log-prob| over the response tokens (sample_log_probs [B,R] as SampleOutput.log_probs; a gap
    far from 0 means sampling and training see different models: dtype, cache, positions, masks).
    nonfinite/<name>: how many entries of each score, log-prob, value and advantage are NaN/inf.
    """
    mask = exp.response_mask
    metrics = {}
    arrays = dict(scores, old_log_probs=jnp.where(mask, exp.old_log_probs, 0.0))
    arrays.update({f"{stream}_advantage": a for stream, a in exp.advantages.items()})
    arrays.update({f"{stream}_value": v for stream, v in exp.values.items()})
    if sample_log_probs is not None:
        arrays["sampler_log_probs"] = jnp.where(mask, sample_log_probs, 0.0)
        metrics.update(logprob_gap(sample_log_probs, exp.old_log_probs, mask))
    for name, value in arrays.items():
        metrics[f"nonfinite/{name}"] = jnp.sum(~jnp.isfinite(value)).astype(jnp.float32)
    return metrics


def logprob_gap(sampler: jax.Array, actor: jax.Array, mask: jax.Array) -> dict:
    """{"logprob_gap_max", "logprob_gap_mean"}: of |sampler - actor| log-probs over the response tokens
    (sampler, actor, mask [B,R]). A non-finite gap counts as 0 here (health_metrics counts it)."""
    gap = jnp.where(mask, jnp.abs(sampler - actor), 0.0)
    gap = jnp.where(jnp.isfinite(gap), gap, 0.0)
    return {"logprob_gap_max": jnp.max(gap), "logprob_gap_mean": jnp.sum(gap) / jnp.maximum(jnp.sum(mask), 1)}


def score_step(fns: RoleFns, algorithm: Algorithm, settings: RLSettings, frozen: dict, state: RLState,
               input_ids: jax.Array, attention_mask: jax.Array,
               sample_log_probs: jax.Array | None = None,
               retokenized: dict | None = None, stack: bool = False) -> tuple[Experience, dict, dict]:
    """Experience of a rollout batch. -> (experience, sequence scores {scorer: [B]}, batch means {name: []}
    with the health metrics). sample_log_probs [B,R]: the sampler's log-probs (None: no gap metrics);
    retokenized: {scorer: (ids, mask) [B,L']} for the scorers with their own tokenizer."""
    params = dict(frozen, actor=actor_params(fns, state.actor.params, frozen))
    params.update({f"{stream}_critic": role_params(fns, f"{stream}_critic", critic.params, frozen)
                   for stream, critic in state.critics.items()})
    exp, stats = score_experience(fns, algorithm, settings, params, state.kl_coeff, input_ids, attention_mask,
                                  retokenized, stack, sample_log_probs)
    means = {name: jnp.mean(value) for name, value in stats.items()}
    means["mean_generated_length"] = means.pop("generated_length")
    means["max_generated_length"] = jnp.max(stats["generated_length"])
    means["max_length_fraction"] = jnp.mean(stats["generated_length"] >= settings.max_new_tokens)
    scores = {name: stats[name] for name in algorithm.scorers}
    # old log-probs from the sampler: their gap to the actor's is measured by the first update (logprob_gap)
    recomputed = settings.old_log_probs != "sampler"
    means.update(health_metrics(exp, scores, sample_log_probs if recomputed else None))
    return exp, scores, means


def actor_gradients(fns: RoleFns, algorithm: Algorithm, settings: RLSettings, params: Any, exp: Experience,
                    advantages: jax.Array, ptx_batch: dict | None, stack: bool) -> tuple[Any, dict]:
    """The actor's gradient: g_RL, or 0.5*(g_RL + ptx_coeff*g_PTX) with PTX (upstream doubles GAS when
    PTX is on: one update on the mean of the two backward passes). -> (grads, loss metrics; with
    rl.old_log_probs "sampler" also logprob_gap of the actor's log-probs against exp.old_log_probs, the
    sampler's: exact at the first update of an iteration, whose params are the rollout's)."""
    if stack and settings.ptx_coeff > 0 and can_fuse_ptx(exp, ptx_batch):
        (_, (loss, ptx, log_probs)), grads = jax.value_and_grad(actor_rl_ptx_loss, argnums=3, has_aux=True)(
            fns, algorithm, settings, params, exp, advantages, ptx_batch)
        metrics = {"actor_loss": loss, "ptx_loss": ptx}
    else:
        (loss, log_probs), grads = jax.value_and_grad(actor_rl_loss_and_log_probs, argnums=3, has_aux=True)(
            fns, algorithm, settings, params, exp, advantages)
        metrics = {"actor_loss": loss}
        if settings.ptx_coeff > 0:
            ptx, ptx_grads = jax.value_and_grad(ptx_loss, argnums=1)(fns, params, ptx_batch)
            grads = jax.tree.map(lambda g, p: 0.5 * (g + settings.ptx_coeff * p), grads, ptx_grads)
            metrics["ptx_loss"] = ptx
    if settings.old_log_probs == "sampler":
        metrics.update(logprob_gap(exp.old_log_probs, jax.lax.stop_gradient(log_probs), exp.response_mask))
    return grads, metrics


def critic_updates(fns: RoleFns, settings: RLSettings, optimizers: Optimizers, critics: dict, exp: Experience,
                   stack: bool) -> tuple[dict, dict]:
    """One clipped value update of every critic; critics of one module and param shapes as one
    vmapped update over stacked TrainStates. -> ({stream: TrainState}, {"<stream>_critic_loss": []})."""
    score_fns = {f"{stream}_critic": fns.scores[f"{stream}_critic"] for stream in critics}
    params = {f"{stream}_critic": critic.params for stream, critic in critics.items()}
    new, metrics = {}, {}
    for group in stacking.stack_groups(score_fns, params, stack=stack):
        streams = [role[: -len("_critic")] for role in group]
        if len(group) == 1:
            (stream,), critic = streams, critics[streams[0]]
            loss, grads = jax.value_and_grad(value_loss, argnums=2)(
                score_fns[group[0]], settings, critic.params, exp, exp.values[stream], exp.returns[stream])
            new[stream], metrics[f"{stream}_critic_loss"] = critic.apply_gradients(grads, optimizers.critic), loss
            continue

        def total_loss(stacked_params):
            raw = stacking.stacked_raw(score_fns[group[0]], stacked_params, exp.input_ids, exp.attention_mask)
            losses = []
            for index, (role, stream) in enumerate(zip(group, streams)):
                values = stacking.parts(score_fns[role])[2](raw[index])[:, settings.start:-1].astype(jnp.float32)
                losses.append(ppo.critic_loss(values, exp.values[stream], exp.returns[stream], exp.response_mask,
                                              settings.clip_range_value))
            # Each critic's loss reads only its own slice, so the gradient of the sum is each one's own.
            return sum(losses), losses

        stacked = stacking.stack_trees([critics[stream] for stream in streams])
        (_, losses), grads = jax.value_and_grad(total_loss, has_aux=True)(stacked.params)
        stacked = jax.vmap(lambda critic, g: critic.apply_gradients(g, optimizers.critic))(stacked, grads)
        for stream, critic, loss in zip(streams, stacking.unstack_trees(stacked, len(streams)), losses):
            new[stream], metrics[f"{stream}_critic_loss"] = critic, loss
    return {stream: new[stream] for stream in critics}, metrics


def train_step(fns: RoleFns, algorithm: Algorithm, settings: RLSettings, optimizers: Optimizers, state: RLState,
               exp: Experience, multiplier: jax.Array, ptx_batch: dict | None,
               stack: bool = False) -> tuple[RLState, dict]:
    """One actor update (RL + PTX) and one update of each critic on an experience batch."""
    advantages = actor_advantages(algorithm, settings, exp, multiplier)
    grads, metrics = actor_gradients(fns, algorithm, settings, state.actor.params, exp, advantages, ptx_batch, stack)
    metrics["actor_learning_rate"] = optimizers.actor_schedule(state.actor.step)
    metrics["actor_grad_norm"] = optax.tree.norm(grads)
    actor = state.actor.apply_gradients(grads, optimizers.actor)
    metrics["actor_param_norm"] = optax.tree.norm(actor.params)

    critics, critic_metrics = critic_updates(fns, settings, optimizers, state.critics, exp, stack)
    metrics.update(critic_metrics)
    if critics:
        metrics["critic_learning_rate"] = optimizers.critic_schedule(next(iter(state.critics.values())).step)
    return state.replace(actor=actor, critics=critics), metrics


def minibatch(exp: Experience, index: int, num_minibatches: int) -> Experience:
    """The index-th of num_minibatches equal slices of the batch axis."""
    size = exp.input_ids.shape[0] // num_minibatches
    return jax.tree.map(lambda x: x[index * size:(index + 1) * size], exp)


# ------------------------------------------------------------------------------------ compiled program


@dataclasses.dataclass
class RLProgram:
    """The jitted steps of one configuration, with explicit shardings."""

    rollout: Callable  # (actor params, prompt_ids, prompt_mask, rng) -> (input_ids, attention_mask, log_probs)
    generate: Callable  # the same without the log-probs
    score: Callable  # (frozen, state, input_ids, attention_mask[, sampler log_probs]) -> (exp, scores, means)
    score_jit: Callable  # the jitted score step (sampler log_probs [+ retokenized] required): for AOT lowering
    train: Callable  # (state, exp, multiplier, ptx batch, frozen[, prompt_length]) -> (state, metrics)
    train_jit: Callable  # the jitted train step at the full prompt_length: for AOT lowering
    take_minibatch: Callable
    columns: Callable  # (x [B,L], begin, end) -> x[:, begin:end], batch-sharded (static bounds)
    used_columns: Callable  # real_columns, replicated
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: Any
    ptx_shardings: Any
    # (trained actor params, frozen) -> the rollout's actor params (LoRA: lora.Adapted(base, adapters))
    actor_params: Callable | None = None


def abstract_experience(algorithm: Algorithm, batch: int, length: int, response: int, sharding=None) -> Experience:
    """An Experience of jax.ShapeDtypeStructs ([batch, length] tokens, [batch, response] per-token
    arrays, `sharding` on each) for lowering the train step without a rollout (experiments, plans)."""
    array = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    per_token = lambda: array((batch, response), jnp.float32)  # noqa: E731
    return Experience(input_ids=array((batch, length), jnp.int32), attention_mask=array((batch, length), jnp.bool_),
                      response_mask=array((batch, response), jnp.bool_), old_log_probs=per_token(),
                      ref_log_probs=per_token(), advantages={stream: per_token() for stream in algorithm.streams},
                      values={stream: per_token() for stream in algorithm.critics},
                      returns={stream: per_token() for stream in algorithm.critics})


def rl_state_shardings(state: RLState, param_shardings: dict, optimizers: Optimizers, mesh) -> RLState:
    """Shardings of an RLState: each TrainState's moments follow its params; the rest replicated."""
    rep = mesh_lib.replicated(mesh)
    critics = {stream: mesh_lib.state_shardings(critic, param_shardings[f"{stream}_critic"], optimizers.critic, mesh)
               for stream, critic in state.critics.items()}
    return RLState(
        actor=mesh_lib.state_shardings(state.actor, param_shardings["actor"], optimizers.actor, mesh),
        critics=critics,
        algorithm=jax.tree.map(lambda _: rep, state.algorithm),
        kl_coeff=rep,
        rng=rep,
        iteration=rep,
    )


def real_columns(mask: jax.Array) -> jax.Array:
    """[first, end]: the columns first..end-1 of a [B,L] mask hold every real token (all of them
    when no row has one). -> [2] int32."""
    used = jnp.any(mask, axis=0)
    length = mask.shape[1]
    first = jnp.where(jnp.any(used), jnp.argmax(used), 0)
    end = jnp.where(jnp.any(used), length - jnp.argmax(used[::-1]), length)
    return jnp.stack([first, end]).astype(jnp.int32)


def trimmed(settings: RLSettings, prompt_length: int) -> RLSettings:
    """settings of a batch with prompt_length prompt columns (rl.length_bucket trims padding)."""
    if prompt_length == settings.prompt_length:
        return settings
    return dataclasses.replace(settings, prompt_length=prompt_length)


def compile_program(fns: RoleFns, algorithm: Algorithm, settings: RLSettings, optimizers: Optimizers, mesh,
                    abstract_state: RLState, param_shardings: dict, frozen_shardings: dict,
                    ptx_shardings: Any = None, stack_roles: bool = False) -> RLProgram:
    """jit the three steps with batch-sharded activations and per-role parameter shardings.

    abstract_state: an RLState of arrays or ShapeDtypeStructs (only its structure is used).
    ptx_shardings: shardings of the PTX batch dict (None when ptx_coeff is 0).
    stack_roles: run roles of one architecture as one batched pass (False: each alone).
    """
    state_sh = rl_state_shardings(abstract_state, param_shardings, optimizers, mesh)
    rep = mesh_lib.replicated(mesh)
    batch2 = mesh_lib.batch_sharding(mesh, 2)
    batch1 = mesh_lib.batch_sharding(mesh, 1)
    exp_sh = Experience(input_ids=batch2, attention_mask=batch2, response_mask=batch2, old_log_probs=batch2,
                        ref_log_probs=batch2, advantages=dict.fromkeys(algorithm.streams, batch2),
                        values=dict.fromkeys(algorithm.critics, batch2), returns=dict.fromkeys(algorithm.critics, batch2))
    rollout = jax.jit(
        fns.generate,
        in_shardings=(actor_shardings(fns, param_shardings, frozen_shardings), batch2, batch2, rep),
        out_shardings=(batch2, batch2, batch2),
    ) if fns.generate is not None else None
    retokenizers = {role: tok for role, tok in fns.retokenizers.items() if role in algorithm.scorers}
    # With re-tokenised scorers the score step takes a 6th argument {scorer: (ids, mask)}.
    retokenized_sh = (dict.fromkeys(retokenizers, (batch2, batch2)),) if retokenizers else ()
    # The score and train steps of batches with prompt_length prompt columns (fewer than
    # settings.prompt_length when rl.length_bucket trims padding): one jit per length.
    @functools.cache
    def score_at(prompt_length: int):
        at = trimmed(settings, prompt_length)

        def step(frozen, state, ids, mask, log_probs, *retokenized):
            with layer_loop.forward_only():  # forwards only: rolled is faster on XLA:CPU for models >= 512 wide
                return score_step(fns, algorithm, at, frozen, state, ids, mask, log_probs, *retokenized,
                                  stack=stack_roles)

        return jax.jit(
            step,
            in_shardings=(frozen_shardings, state_sh, batch2, batch2, batch2, *retokenized_sh),
            out_shardings=(exp_sh, batch1, rep),
        )

    @functools.cache
    def train_at(prompt_length: int):
        at = trimmed(settings, prompt_length)
        return jax.jit(
            lambda state, exp, multiplier, ptx, frozen: train_step(trained_fns(fns, frozen), algorithm, at, optimizers,
                                                                   state, exp, multiplier, ptx, stack_roles),
            in_shardings=(state_sh, exp_sh, rep, ptx_shardings, frozen_shardings),
            out_shardings=(state_sh, rep),
            donate_argnums=0,
        )

    def generate(params, prompt_ids, prompt_mask, rng, frozen=None):
        """The trained actor params (+ the frozen roles for a LoRA actor) -> (input_ids, attention_mask)."""
        return rollout(actor_params(fns, params, frozen), prompt_ids, prompt_mask, rng)[:2]

    def score(frozen, state, ids, mask, log_probs=None, prompt_length=settings.prompt_length):
        # Scorers with their own tokenizer: the sequences re-tokenised on the host (upstream batch_retokenize), every
        # row on every process, placed batch-sharded like the rollout.
        if not retokenizers:
            return score_at(prompt_length)(frozen, state, ids, mask, log_probs)
        host_ids, host_mask = mesh_lib.global_rows(ids), mesh_lib.global_rows(mask)
        retokenized = {role: jax.device_put(retokenize(host_ids, host_mask, fns.actor_tokenizer, tok,
                                                       settings.sequence_length), batch2)
                       for role, tok in retokenizers.items()}
        return score_at(prompt_length)(frozen, state, ids, mask, log_probs, retokenized)

    def train(state, exp, multiplier, ptx, frozen, prompt_length=settings.prompt_length):
        return train_at(prompt_length)(state, exp, multiplier, ptx, frozen)

    columns = jax.jit(lambda x, begin, end: x[:, begin:end], static_argnums=(1, 2), out_shardings=batch2)
    used_columns = jax.jit(real_columns, out_shardings=rep)
    take_minibatch = jax.jit(
        lambda exp, index: minibatch(exp, index, settings.num_minibatches),
        static_argnums=1,
        in_shardings=(exp_sh,),
        out_shardings=exp_sh,
    )
    return RLProgram(rollout=rollout, generate=generate, score=score, score_jit=score_at(settings.prompt_length),
                     train=train, train_jit=train_at(settings.prompt_length),
                     take_minibatch=take_minibatch, columns=columns, used_columns=used_columns,
                     state_shardings=state_sh, frozen_shardings=frozen_shardings, batch_sharding=batch2,
                     ptx_shardings=ptx_shardings,
                     actor_params=lambda params, frozen: actor_params(fns, params, frozen))
