"""The three steps of an RL iteration (rollout, scoring, update) from abstract roles.

    steps = rl_steps(RLPlan(algorithm, settings, optimizers, actor_cfg, scorers, batch_size=128), mesh, rules)

Every role becomes abstract params on the mesh (loading.abstract_params / lora.abstract_adapters:
nothing allocated) and the role functions the RL stage builds (roles.policy_fn, roles.sampler_fn,
roles.score_role_fn, roles.moderation_score_fn, roles.ScoreModelFn for a LoRA critic); the steps are
rl/steps.compile_program's jits, so the plan compiles the programs `jaxalign train` runs:

    rollout   program.rollout: the actor samples max_new_tokens for batch_size x num_return_sequences prompts
    scoring   program.score_jit: actor, reference, scorers and critics over the rollout + advantages
    update    program.train_jit: one minibatch (rows / num_minibatches) of PPO-clip + PTX and every
              critic's update (PTX rows: batch_size / num_minibatches, as stages/rl.py batches them)

LoRA (`lora`): the actor is adapters on the reference; `lora_critics`: each critic is adapters + its
own score head on its frozen scorer. `frozen_param_dtype`: the storage dtype of the frozen roles.
Frozen scorers that share one export (multi_lag's constraints on one moderation model) are separate
arguments here, so their argument bytes count once per role (the stage passes one copy).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign import models
from jaxalign.models import loading, lora
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.plan import flops as flops_lib
from jaxalign.plan import steps as steps_lib
from jaxalign.rl import roles, steps
from jaxalign.rl.algorithms.base import Algorithm
from jaxalign.rl.settings import RLSettings


@dataclasses.dataclass(frozen=True)
class ScoreRole:
    """The model of a score role (a scorer or a critic): a ScoreModel or a moderation model;
    signal: the moderation signal a moderation scorer reads ("" for a score model or a critic)."""

    module: nn.Module
    signal: str = ""


@dataclasses.dataclass(frozen=True)
class RLPlan:
    """What the RL plan compiles: the algorithm and its settings, the actor's config, a ScoreRole per
    role besides actor and reference, the options of config.lora / config.rl, and the prompt batch."""

    algorithm: Algorithm
    settings: RLSettings
    optimizers: steps.Optimizers
    actor_cfg: Any
    scorers: dict  # {role: ScoreRole} for every role of algorithm.roles but actor and reference
    batch_size: int  # prompts per iteration (config.data.batch_size)
    lora: lora.LoraSettings | None = None
    lora_critics: bool = False
    frozen_param_dtype: str = ""
    masked_token_ids: tuple[int, ...] = ()


def _frozen(module: nn.Module, dtype: str) -> nn.Module:
    return module.clone(cfg=dataclasses.replace(module.cfg, param_dtype=dtype)) if dtype else module


def build_roles(plan: RLPlan, mesh, rules) -> tuple[roles.RoleFns, dict, dict]:
    """(role functions, abstract params by role, full-model abstract params by role for the FLOPs)."""
    lora_on = plan.lora is not None and plan.lora.enabled
    if plan.lora_critics and not lora_on:
        raise ValueError("config.lora.critics=True needs LoRA on: set config.lora.rank > 0")
    policy = models.causal_lm(plan.actor_cfg)
    trained = set(steps.trained_roles(plan.algorithm))
    params, full = {}, {}
    full["reference"] = params["reference"] = loading.abstract_params(_frozen(policy, plan.frozen_param_dtype),
                                                                      mesh, rules)
    full["actor"] = loading.abstract_params(policy, mesh, rules)
    params["actor"] = lora.abstract_adapters(policy, plan.lora, mesh, rules) if lora_on else full["actor"]
    bases = {"actor": "reference"} if lora_on else {}
    score_fns = {}
    for role in plan.algorithm.roles:
        if role in ("actor", "reference"):
            continue
        if role not in plan.scorers:
            raise ValueError(f"the plan has no model for the {role} role")
        spec = plan.scorers[role]
        is_trained = role in trained
        if is_trained and plan.lora_critics:
            scorer = role[: -len("_critic")]
            base = plan.scorers[scorer].module
            bases[role] = scorer
            full[role] = loading.abstract_params(spec.module, mesh, rules)
            params[role] = {**lora.abstract_adapters(base, plan.lora, mesh, rules), "score_head": full[role]["score_head"]}
            score_fns[role] = roles.ScoreModelFn(base, None, "critic", adapted=lora.wrap(base, plan.lora))
            continue
        module = spec.module if is_trained else _frozen(spec.module, plan.frozen_param_dtype)
        full[role] = params[role] = loading.abstract_params(module, mesh, rules)
        score_fns[role] = (roles.moderation_score_fn(module, spec.signal) if spec.signal
                           else roles.score_role_fn(module, None, role))
    cfg = plan.actor_cfg
    fns = roles.RoleFns(policy=roles.policy_fn(cfg, plan.lora),
                        log_probs=roles.log_probs_fn(cfg, plan.lora, plan.settings.logits_chunk),
                        generate=roles.sampler_fn(cfg, plan.settings, cfg.pad_token_id, plan.masked_token_ids, plan.lora),
                        scores=score_fns, bases=bases)
    return fns, params, full


@dataclasses.dataclass(frozen=True)
class Built:
    """An RL program compiled from abstract roles, with what its steps take."""

    program: steps.RLProgram
    fns: roles.RoleFns
    params: dict  # {role: abstract params with shardings} (a LoRA role: its adapters [+ head])
    full: dict  # {role: abstract params of the whole model} (for the FLOPs)
    abstract_state: steps.RLState  # ShapeDtypeStructs (shardings in program.state_shardings)


def build_program(plan: RLPlan, mesh, rules, stack_roles: bool = False) -> Built:
    """rl/steps.compile_program over the plan's abstract roles (see the module docstring)."""
    algorithm, settings = plan.algorithm, plan.settings
    fns, params, full = build_roles(plan, mesh, rules)
    shardings = {role: jax.tree.map(lambda x: x.sharding, tree) for role, tree in params.items()}
    trained_names = steps.trained_roles(algorithm)
    trained = {name: params[name] for name in trained_names}
    abstract_state = jax.eval_shape(
        lambda p, key: steps.init_rl_state(algorithm, settings, p, plan.optimizers, key), trained,
        mesh_lib.abstract_key())
    ptx_shardings = None
    if settings.ptx_coeff > 0:
        ptx_shardings = {key: mesh_lib.batch_sharding(mesh, 2) for key in ("input_ids", "attention_mask", "loss_mask")}
    frozen_shardings = {name: shardings[name] for name in params if name not in trained_names}
    program = steps.compile_program(fns, algorithm, settings, plan.optimizers, mesh, abstract_state, shardings,
                                    frozen_shardings, ptx_shardings, stack_roles=stack_roles)
    return Built(program, fns, params, full, abstract_state)


def rl_steps(plan: RLPlan, mesh, rules, stack_roles: bool = False) -> list[steps_lib.Step]:
    """The rollout, scoring and update steps of one iteration, with abstract arguments."""
    algorithm, settings = plan.algorithm, plan.settings
    built = build_program(plan, mesh, rules, stack_roles)
    program, fns, params, full = built.program, built.fns, built.params, built.full
    trained_names = steps.trained_roles(algorithm)
    frozen = {name: tree for name, tree in params.items() if name not in trained_names}
    abstract_state = built.abstract_state
    state = mesh_lib.with_shardings(abstract_state, program.state_shardings)
    rep = mesh_lib.replicated(mesh)

    def array(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.batch_sharding(mesh, len(shape)))

    rows = plan.batch_size * settings.num_return_sequences
    prompt, new, length = settings.prompt_length, settings.max_new_tokens, settings.sequence_length
    mb_rows, ptx_rows = rows // settings.num_minibatches, plan.batch_size // settings.num_minibatches
    exp = steps.abstract_experience(algorithm, mb_rows, length, new, mesh_lib.batch_sharding(mesh, 2))
    ptx = None
    if settings.ptx_coeff > 0:
        ptx = {"input_ids": array((ptx_rows, length), jnp.int32), "attention_mask": array((ptx_rows, length), jnp.bool_),
               "loss_mask": array((ptx_rows, length), jnp.bool_)}
    multiplier = jax.eval_shape(lambda s: jnp.asarray(algorithm.multiplier(settings, s), jnp.float32),
                                abstract_state.algorithm)
    multiplier = jax.ShapeDtypeStruct(multiplier.shape, multiplier.dtype, sharding=rep)
    key = jax.ShapeDtypeStruct(mesh_lib.abstract_key().shape, mesh_lib.abstract_key().dtype, sharding=rep)

    counts = {role: flops_lib.ModelCounts.of(plan.actor_cfg if role in ("actor", "reference") else
                                             plan.scorers[role].module.cfg, tree) for role, tree in full.items()}
    lora_on = "actor" in fns.bases
    rollout_passes = (flops_lib.Pass(counts["actor"], rows * prompt, prompt),
                      flops_lib.Pass(counts["actor"], rows * new, prompt + new // 2, "decode"))
    score_passes = tuple(flops_lib.Pass(counts[role], rows * length, length) for role in counts)
    update_passes = [flops_lib.Pass(counts["actor"], mb_rows * length, length, "train_frozen" if lora_on else "train")]
    if ptx is not None:
        update_passes.append(flops_lib.Pass(counts["actor"], ptx_rows * length, length,
                                            "train_frozen" if lora_on else "train"))
    update_passes += [flops_lib.Pass(counts[role], mb_rows * length, length,
                                     "train_frozen" if role in fns.bases else "train")
                      for role in trained_names if role != "actor"]
    roles_text = ", ".join(name for name in params if name not in ("actor",))
    return [
        steps_lib.Step("rollout", program.rollout,
                       (program.actor_params(params["actor"], frozen), array((rows, prompt), jnp.int32),
                        array((rows, prompt), jnp.bool_), key),
                       tokens=rows * new, passes=rollout_passes,
                       note=f"actor samples {new} tokens for {rows} prompts of {prompt}"),
        steps_lib.Step("scoring", program.score_jit,
                       (frozen, state, array((rows, length), jnp.int32), array((rows, length), jnp.bool_),
                        array((rows, new), jnp.float32)),
                       tokens=rows * length, passes=score_passes,
                       note=f"actor, {roles_text} over {rows} x {length} + advantages"),
        steps_lib.Step("update", program.train_jit, (state, exp, multiplier, ptx, frozen),
                       tokens=mb_rows * length + (ptx_rows * length if ptx is not None else 0),
                       passes=tuple(update_passes),
                       note=f"one of {settings.num_minibatches} minibatches: {mb_rows} rows"
                            + (f" + {ptx_rows} PTX rows" if ptx is not None else "")
                            + f", {len(trained_names)} trained role(s)"),
    ]
