"""RL stages (config.stage = an algorithm of jaxalign/rl/algorithms.ALGORITHMS: ppo | ppo_lag |
ppo_reward_shaping | safe_grpo | multi_lag | ...). Reads config.rl (RLSettings and the role paths) and
config.rl.<algorithm> (the algorithm's own settings), then wires the library.

    jaxalign train --config configs/ppo_lag_tiny.py --workdir out/ppo_lag_tiny

mesh -> tokenizer (left padding) -> prompt and PTX batches -> the algorithm's roles on the mesh
(actor and reference from config.model.init_path, score models from config.rl.*_model_path) ->
the compiled generate / score / train steps -> the one loop (one step = one iteration; the frozen
roles ride along, never donated nor checkpointed) -> WORKDIR/export (the actor as an HF dir).

With config.lora.rank > 0 the actor is adapters on the reference (one frozen copy of the policy):
the RL state and checkpoints hold only the actor's adapters (and the critics); the export merges
them (or writes them as an HF PEFT dir, config.lora.export). With config.lora.critics each critic is
adapters + its own score head on its frozen reward / cost model. config.rl.frozen_param_dtype stores
the frozen roles in another dtype (bfloat16: half their memory).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax

from jaxalign.data import pipeline, views
from jaxalign.evaluate import judge
from jaxalign.models import loading
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.rl import algorithms, evaluation, iteration, ptx, roles, steps
from jaxalign.rl.settings import RLSettings
from jaxalign.stages import common
from jaxalign.train import loop, optim

log = logging.getLogger(__name__)


def role_paths(config, algorithm: algorithms.Algorithm, settings: RLSettings, check: bool = True) -> roles.RolePaths:
    """The score-model dirs of config.rl, checked against what the algorithm reads (RolePaths.check;
    check=False: the signals only, for a plan of a run whose exports do not exist yet)."""
    rl = config.rl
    paths = roles.RolePaths(reward=rl.reward_model_path, cost=rl.cost_model_path,
                            reward_critic=rl.reward_critic_model_path, cost_critic=rl.cost_critic_model_path,
                            cost_signal=rl.cost_signal, constraints=algorithm.moderation_signals)
    if check:
        paths.check(algorithm.token_streams(settings), where=f"config.rl.{algorithm.name}")
    else:
        roles.check_signal(paths.cost_signal, "config.rl.cost_signal")
    return paths


def check_minibatches(config, settings: RLSettings, mesh) -> int:
    """config.data.batch_size, checked to split into rl.num_minibatches minibatches that each divide
    over the mesh's batch shards."""
    batch_size = common.check_batch_size(config, mesh)
    if batch_size % (settings.num_minibatches * mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"config.data.batch_size {batch_size} must split into rl.num_minibatches="
                         f"{settings.num_minibatches} minibatches that each divide over the batch shards")
    return batch_size


FROZEN_DTYPES = ("", "float32", "bfloat16")


def frozen_param_dtype(config) -> str:
    """config.rl.frozen_param_dtype: "" (= config.model.param_dtype), float32 or bfloat16."""
    dtype = str(config.rl.frozen_param_dtype)
    if dtype not in FROZEN_DTYPES:
        raise ValueError(f"config.rl.frozen_param_dtype: expected one of {FROZEN_DTYPES}, got {dtype!r}")
    return dtype


def make_optimizers(config, num_updates: int) -> steps.Optimizers:
    """Actor: config.train (AdamW, cosine + warmup); critics: config.rl.critic (constant)."""
    actor = common.optimizer_settings(config)
    critic = optim.OptimizerSettings.from_group(config.rl.critic, "config.rl.critic")
    return steps.Optimizers(
        actor=optim.make_optimizer(actor, num_updates),
        critic=optim.make_optimizer(critic, num_updates),
        actor_schedule=optim.make_schedule(actor, num_updates),
        critic_schedule=optim.make_schedule(critic, num_updates),
    )


def load_batches(config, settings: RLSettings, tokenizer, mesh) -> tuple[iteration.RLBatches, int]:
    """Prompt batches (+ PTX batches when ptx_coeff > 0) and the number of prompts per epoch."""
    template = common.prompt_template(config, tokenizer)
    rows, _ = common.read_rows(config, config.data.train_split)
    prompts = views.prompt_examples(rows, template=template)
    batch_size = int(config.data.batch_size)
    prompt_iter = pipeline.make_batches(
        "prompt", prompts, tokenizer, batch_size=batch_size, max_length=settings.prompt_length, mesh=mesh,
        seed=config.seed, shuffle=bool(config.data.shuffle), num_epochs=None)
    ptx_iter = None
    if settings.ptx_coeff > 0:
        source = config.rl.ptx_source or config.data.source
        ptx_rows, _ = common.read_rows(config, config.data.train_split, source=source, name=config.rl.ptx_name)
        ptx_examples = ptx.ptx_examples(ptx_rows, template, config.rl.ptx_response)
        log.info("PTX (%s): %s", config.rl.ptx_response, dict(ptx_examples.counts))
        ptx_iter = pipeline.make_batches(
            "sft", ptx_examples, tokenizer, batch_size=batch_size // settings.num_minibatches,
            max_length=settings.sequence_length, mesh=mesh, seed=config.seed + 1, shuffle=bool(config.data.shuffle),
            num_epochs=None)
    log.info("%d prompts (%s), PTX %s", len(prompts), dict(prompts.counts), "off" if ptx_iter is None else "on")
    ptx_per_iteration = settings.ppo_epochs * settings.num_minibatches
    return iteration.RLBatches(prompt_iter, ptx_iter, ptx_per_iteration), len(prompts)


def make_eval_fn(config, settings: RLSettings, program: steps.RLProgram, fns: roles.RoleFns, tokenizer, mesh, rules):
    """The in-loop evaluation on config.data.eval_split's first config.rl.eval_prompts distinct
    prompts (rl/evaluation.py; the exact judge when they are mini prompts); None when
    config.rl.eval_every is 0."""
    every = int(config.rl.eval_every)
    if every < 0:
        raise ValueError(f"config.rl.eval_every must be >= 0 (0 = off), got {every}")
    if every == 0:
        return None
    if fns.retokenizers:  # rl/evaluation.py scores with the actor's tokens only
        raise ValueError(f"config.rl.eval_every > 0: the in-loop evaluation cannot score with the "
                         f"{'/'.join(sorted(fns.retokenizers))} model's own tokenizer (re-tokenised in training only): "
                         f"set config.rl.eval_every=0")
    if not config.data.eval_split:
        raise ValueError("config.rl.eval_every > 0 needs held-out prompts: set config.data.eval_split")
    rows, _ = common.read_rows(config, config.data.eval_split)
    prompts = judge.unique_prompts(rows)
    if int(config.rl.eval_prompts) >= 0:
        prompts = prompts[: int(config.rl.eval_prompts)]
    use_judge = judge.mini_prompts(prompts)
    log.info("RL evaluation every %d iterations on %d %s prompts%s", every, len(prompts), config.data.eval_split,
             " (+ the exact judge)" if use_judge else "")
    eval_settings = evaluation.EvalSettings(batch_size=int(config.data.batch_size),
                                            prompt_length=settings.prompt_length, use_judge=use_judge,
                                            seed=int(config.seed))
    return evaluation.make_eval_fn(program.generate, fns.scores, prompts, tokenizer, eval_settings, mesh, rules,
                                   common.prompt_template(config, tokenizer))


def run(config, workdir) -> loop.LoopResult:
    """Trains the RL stage in `workdir` (resuming from WORKDIR/checkpoints) and exports the actor."""
    workdir = pathlib.Path(workdir)
    algorithm = algorithms.make(config.stage, has_cost_model=bool(config.rl.cost_model_path),
                                settings=algorithms.settings_from_group(config.stage, config.rl))
    settings = RLSettings.from_group(config.rl)
    paths = role_paths(config, algorithm, settings)
    mesh, rules = common.mesh_and_rules(config)
    batch_size = check_minibatches(config, settings, mesh)
    tokenizer = common.load_tokenizer(config, padding_side="left")
    batches, num_prompts = load_batches(config, settings, tokenizer, mesh)
    num_iterations = common.num_steps(config, num_prompts // batch_size)
    optimizers = make_optimizers(config, num_iterations * settings.ppo_epochs * settings.num_minibatches)

    rng = jax.random.PRNGKey(config.seed)
    lora_settings = common.lora_settings(config)
    lora_export = common.lora_export(config)
    fns, params, shardings, actor_cfg = roles.load_roles(algorithm.roles, common.model_settings(config), paths,
                                                         settings, tokenizer, mesh, rules, rng, lora_settings,
                                                         bool(config.lora.critics), frozen_param_dtype(config))
    trained = {name: params.pop(name) for name in steps.trained_roles(algorithm)}
    frozen = params  # reference and score models: passed to every step, never donated or checkpointed
    abstract = jax.eval_shape(lambda p: steps.init_rl_state(algorithm, settings, p, optimizers, rng), trained)
    ptx_shardings = None
    if settings.ptx_coeff > 0:
        ptx_shardings = {key: mesh_lib.batch_sharding(mesh, 2) for key in ("input_ids", "attention_mask", "loss_mask")}
    program = steps.compile_program(fns, algorithm, settings, optimizers, mesh, abstract, shardings,
                                    {name: shardings[name] for name in frozen}, ptx_shardings)
    log.info("%s: %d iterations of %d prompts, %d new tokens", algorithm.name, num_iterations, batch_size,
             settings.max_new_tokens)
    eval_fn = make_eval_fn(config, settings, program, fns, tokenizer, mesh, rules)
    loop_settings = dataclasses.replace(common.loop_settings(config, num_iterations, algorithm.name),
                                        eval_every=int(config.rl.eval_every))
    result = loop.run(
        settings=loop_settings,
        workdir=workdir, mesh=mesh, rules=rules,
        step_fn=iteration.iteration_step(program, algorithm, settings),
        abstract_state=mesh_lib.with_shardings(abstract, program.state_shardings),
        init_state=lambda: steps.init_rl_state(algorithm, settings, trained, optimizers, rng),
        batches=batches, frozen=frozen, eval_fn=eval_fn,
    )
    if fns.actor_base:  # LoRA: the adapters on the reference
        export = lambda out: loading.export_lora_policy(  # noqa: E731
            out, actor_cfg, frozen[fns.actor_base], result.state.actor.params, lora_settings, tokenizer, lora_export,
            base_model=config.model.init_path)
    else:
        export = lambda out: loading.export_policy(out, actor_cfg, result.state.actor.params, tokenizer)  # noqa: E731
    common.export_once(result, workdir, export)
    return result
