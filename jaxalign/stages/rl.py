"""RL stages (config.stage = an algorithm of jaxalign/rl/algorithms: ppo | ppo_lag | ppo_reward_shaping |
safe_grpo | multi_lag).

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
from jaxalign.models import loading, moderation
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.rl import algorithms, evaluation, iteration, roles, steps
from jaxalign.rl.settings import RLSettings
from jaxalign.stages import common
from jaxalign.train import loop, optim

log = logging.getLogger(__name__)


def check_signal(signal: str, field: str) -> None:
    """A moderation signal (models/moderation.cost_signal) or ValueError naming `field`."""
    index = signal[len("category:"):] if signal.startswith("category:") else ""
    if signal in moderation.COST_SIGNALS or (index.isdigit() and int(index) < len(moderation.HARM_CATEGORIES)):
        return
    raise ValueError(f"{field}: unknown moderation signal {signal!r}; expected one of {', '.join(moderation.COST_SIGNALS)} "
                     f"or category:<index> with index < {len(moderation.HARM_CATEGORIES)}")


CONSTRAINT_KEYS = ("lambda_init", "lambda_lr", "window_size")


def parse_constraints(config, check_paths: bool = True) -> tuple[tuple[algorithms.Constraint, ...],
                                                                  tuple[tuple[str, str], ...]]:
    """config.rl.constraints ("severity3<=0.01;lambda_lr=0.5,unsafe<=0.05", see configs/base.py) ->
    (the multi_lag Constraints, their (role, moderation signal) pairs; "cost" has none).
    check_paths=False skips checking that config.rl.cost_model_path is a moderation export (a plan
    of a run whose exports do not exist yet)."""
    rl, field = config.rl, "config.rl.constraints"
    spec = str(rl.constraints).strip()
    if config.stage != "multi_lag":
        if spec:
            raise ValueError(f"{field} is read by stage multi_lag only (config.stage is {config.stage!r}): set it to ''")
        return (), ()
    if not spec:
        raise ValueError(f"{field}: multi_lag needs at least one constraint, e.g. 'severity3<=0.01,unsafe<=0.05'")
    constraints, signals = [], []
    for item in spec.split(","):
        head, *options = [part.strip() for part in item.split(";")]
        name, sep, threshold = head.partition("<=")
        name = name.strip()
        try:
            if not sep or not name:
                raise ValueError
            values = {"threshold": float(threshold), "lambda_init": float(rl.lambda_init),
                      "lambda_lr": float(rl.lambda_lr), "window_size": int(rl.episode_cost_window_size)}
            for option in options:
                key, eq, value = (part.strip() for part in option.partition("="))
                if not eq or key not in CONSTRAINT_KEYS:
                    raise ValueError
                values[key] = int(value) if key == "window_size" else float(value)
        except ValueError:
            raise ValueError(f"{field}: bad constraint {item.strip()!r}; expected 'name<=threshold' with optional "
                             f"';key=value' for key in {', '.join(CONSTRAINT_KEYS)}") from None
        if name != "cost":
            check_signal(name, f"{field} ({item.strip()!r})")
            signals.append((name.replace(":", "_"), name))
        try:
            constraints.append(algorithms.Constraint(name.replace(":", "_"), **values))
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
    names = [c.name for c in constraints]
    if len(set(names)) != len(names):
        raise ValueError(f"{field}: each constraint needs its own name, got {names}")
    if check_paths and signals and not moderation.is_moderation_dir(rl.cost_model_path):
        raise ValueError(f"{field}: {', '.join(s for _, s in signals)} read a moderation model but "
                         f"config.rl.cost_model_path={rl.cost_model_path!r} is not a moderation export")
    return tuple(constraints), tuple(signals)


def role_paths(config, constraint_signals: tuple[tuple[str, str], ...] = ()) -> roles.RolePaths:
    rl = config.rl
    if rl.cost_model_path and moderation.is_moderation_dir(rl.cost_model_path):
        check_signal(rl.cost_signal, "config.rl.cost_signal")
    elif rl.cost_signal != "unsafe":
        raise ValueError(f"config.rl.cost_signal={rl.cost_signal!r} needs config.rl.cost_model_path to be a moderation "
                         f"export (got {rl.cost_model_path!r})")
    return roles.RolePaths(reward=rl.reward_model_path, cost=rl.cost_model_path,
                           reward_critic=rl.reward_critic_model_path, cost_critic=rl.cost_critic_model_path,
                           cost_signal=rl.cost_signal, constraints=constraint_signals)


def check_cost_per_token(config, algorithm: algorithms.Algorithm, settings: RLSettings) -> None:
    """config.rl.cost_per_token needs per-token cost streams (ppo_lag, multi_lag) and a moderation
    export as the cost model (its streaming head scores every prefix of the answer)."""
    if not settings.cost_per_token:
        return
    if not algorithm.token_streams(settings):
        raise ValueError(f"config.rl.cost_per_token is read by ppo_lag and multi_lag only (config.stage is "
                         f"{config.stage!r}): set it to False")
    if not moderation.is_moderation_dir(config.rl.cost_model_path):
        raise ValueError(f"config.rl.cost_per_token needs config.rl.cost_model_path to be a moderation export (its "
                         f"streaming head scores every prefix), got {config.rl.cost_model_path!r}")


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


PTX_RESPONSES = ("safe_only", "safe_better", "safer", "better", "both")


def ptx_sft_examples(rows, template, response: str) -> views.Examples:
    """The PTX SFT examples of config.rl.ptx_response: safe_only = every response labelled safe
    (views.qa_examples filtered on is_safe); safe_better = per row the more helpful of its responses
    labelled safe (rows without one are skipped); else views.sft_examples(response=safer|better|both)."""
    if response not in PTX_RESPONSES:
        raise ValueError(f"config.rl.ptx_response: expected one of {PTX_RESPONSES}, got {response!r}")
    if response == "safe_better":
        out = views.Examples("sft")
        for row in rows:
            b = int(row["better_response_id"])
            safe = [i for i in (b, 1 - b) if row[f"is_response_{i}_safe"]]
            if safe:
                out.append({"prompt": views.format_prompt(row["prompt"], template), "response": row[f"response_{safe[0]}"]})
            else:
                out.counts["skipped_no_safe"] += 1
        out.counts["kept"] = len(out)
        if not out:
            raise ValueError("config.rl.ptx_response='safe_better': the PTX data has no response labelled safe")
        return out
    if response != "safe_only":
        return views.sft_examples(rows, template=template, response=response)
    qa = views.qa_examples(rows, template=template)
    out = views.Examples("sft", ({"prompt": e["prompt"], "response": e["response"]} for e in qa if e["is_safe"]))
    out.counts.update(kept=len(out), skipped_unsafe=len(qa) - len(out))
    if not out:
        raise ValueError("config.rl.ptx_response='safe_only': the PTX data has no response labelled safe")
    return out


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
        ptx_examples = ptx_sft_examples(ptx_rows, template, config.rl.ptx_response)
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
    constraints, constraint_signals = parse_constraints(config)
    algorithm = algorithms.make(config.stage, has_cost_model=bool(config.rl.cost_model_path), constraints=constraints)
    settings = RLSettings.from_group(config.rl)
    check_cost_per_token(config, algorithm, settings)
    mesh, rules = common.mesh_and_rules(config)
    batch_size = common.check_batch_size(config, mesh)
    if batch_size % (settings.num_minibatches * mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"config.data.batch_size {batch_size} must split into rl.num_minibatches="
                         f"{settings.num_minibatches} minibatches that each divide over the batch shards")
    tokenizer = common.load_tokenizer(config, padding_side="left")
    batches, num_prompts = load_batches(config, settings, tokenizer, mesh)
    num_iterations = common.num_steps(config, num_prompts // batch_size)
    optimizers = make_optimizers(config, num_iterations * settings.ppo_epochs * settings.num_minibatches)

    rng = jax.random.PRNGKey(config.seed)
    lora_settings = common.lora_settings(config)
    lora_export = common.lora_export(config)
    fns, params, shardings, actor_cfg = roles.load_roles(algorithm.roles, common.model_settings(config),
                                                         role_paths(config, constraint_signals), settings, tokenizer,
                                                         mesh, rules, rng, lora_settings, bool(config.lora.critics),
                                                         frozen_param_dtype(config))
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
