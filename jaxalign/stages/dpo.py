"""Direct preference stages (config.stage "dpo" | "safe_dpo" | "c_dpo"), objectives in objectives/dpo.py.

    jaxalign train --config configs/dpo_tiny.py --workdir out/dpo_tiny

  * policy and frozen reference: both loaded from config.model.init_path (the SFT export) by two
    separate `load_policy` calls (no shared buffers: the policy state is donated); the reference
    (and, for c_dpo, the frozen reward and cost models of config.dpo.*_model_path) travel as
    `frozen` through the one loop, never donated nor checkpointed;
  * data: dpo / c_dpo read the helpfulness pairs (views.preference_examples); safe_dpo reads the
    same pairs with both safety labels, after SafeDPO's safety-aware transform (the preferred
    answer is the helpfulness-better one unless it is unsafe and the other safe), batched as
    "safety_preference" pairs (first = preferred, signs = safety);
  * c_dpo: λ (log-space, lagrange.py) lives in TrainState.extra, so it is checkpointed and resumes
    exactly; each micro-batch takes one dual-ascent step towards J_C <= config.dpo.threshold;
  * eval: the same loss and metrics (reward accuracy, margins) over the eval split;
  * WORKDIR/export: the policy as an HF dir with the tokenizer.
"""

from __future__ import annotations

import logging
import pathlib
from collections import Counter

import jax

from jaxalign import models
from jaxalign.data import pipeline, views
from jaxalign.models import loading
from jaxalign.objectives import dpo as dpo_lib
from jaxalign.objectives import lagrange as lagrange_lib
from jaxalign.rl import roles
from jaxalign.stages import common
from jaxalign.train import loop, optim, state as state_lib

KINDS = {"dpo": "preference", "safe_dpo": "safety_preference", "c_dpo": "preference"}

log = logging.getLogger(__name__)


def safe_dpo_examples(rows, *, template) -> views.Examples:
    """SafeDPO pairs of dual-preference rows after the safety-aware transform (arXiv 2505.20065 §4):
    preferred = the helpfulness-better answer, unless it is unsafe and the other safe (then the
    other); as safety_preference examples (safer = preferred, signs +1 safe / -1 unsafe).
    Identical answers are skipped; `.counts` has kept, swapped and per-safety-pattern counts."""
    out = views.Examples("safety_preference", counts=Counter())
    needed = ("prompt", "response_0", "response_1", "better_response_id", "is_response_0_safe", "is_response_1_safe")
    for index, row in enumerate(rows):
        for name in needed:
            if name not in row:
                raise KeyError(f"safe_dpo_examples: row {index} has no field {name!r}; SafeDPO needs the "
                               f"dual-preference release (fields {list(needed)})")
        b = row["better_response_id"]
        safe = (bool(row[f"is_response_{b}_safe"]), bool(row[f"is_response_{1 - b}_safe"]))
        if row[f"response_{b}"] == row[f"response_{1 - b}"]:
            out.counts["skipped_identical"] += 1
            continue
        first = 1 - b if (not safe[0] and safe[1]) else b
        out.counts["swapped"] += int(first != b)
        out.counts[{(True, True): "both_safe", (False, False): "both_unsafe"}.get(safe, "one_safe")] += 1
        out.append({
            "prompt": views.format_prompt(row["prompt"], template),
            "safer": row[f"response_{first}"],
            "unsafer": row[f"response_{1 - first}"],
            "safer_sign": 1 if row[f"is_response_{first}_safe"] else -1,
            "unsafer_sign": 1 if row[f"is_response_{1 - first}_safe"] else -1,
        })
    out.counts["kept"] = len(out)
    return out


def load_examples(config, split: str, template):
    rows, _ = common.read_rows(config, split)
    if config.stage == "safe_dpo":
        examples = safe_dpo_examples(rows, template=template)
    else:
        examples = views.preference_examples(rows, template=template)
    log.info("%s %s examples: %s", split, config.stage, dict(examples.counts))
    return examples


def load_scorers(config, settings, tokenizer, mesh, rules):
    """c_dpo: the frozen reward and cost models -> ({role: ScoreFn}, {role: params}, {role: shardings})."""
    group = config.dpo
    fns, params, shardings = {}, {}, {}
    for role, path, normalize in (("reward", group.reward_model_path, group.normalize_reward),
                                  ("cost", group.cost_model_path, group.normalize_cost)):
        if not path:
            raise ValueError(f"c_dpo needs a {role} model: set config.dpo.{role}_model_path")
        placed = loading.load_score_model(path, mesh, rules, settings, score_type=role,
                                          min_vocab_size=len(tokenizer))
        fns[role] = roles.score_role_fn(placed.module, placed.stats if normalize else None, placed.head.score_type)
        params[role], shardings[role] = placed.params, placed.shardings
        log.info("%s model: %s", role, path)
    return fns, params, shardings


def run(config, workdir) -> loop.LoopResult:
    """Trains the preference stage in `workdir` (resuming if it holds checkpoints) and exports the policy."""
    if config.stage not in KINDS:
        raise ValueError(f"the dpo stage runs stages {tuple(KINDS)}, got {config.stage!r}")
    workdir = pathlib.Path(workdir)
    kind = KINDS[config.stage]
    group = config.dpo
    mesh, rules = common.mesh_and_rules(config)
    batch_size = common.check_batch_size(config, mesh)
    tokenizer = common.load_tokenizer(config)
    settings = common.model_settings(config)
    if not settings.init_path:
        raise ValueError("config.model.init_path: DPO starts from a trained policy (the SFT export); it is empty")
    special = loading.special_ids(tokenizer)
    cfg = loading.model_config(settings, vocab_size=len(tokenizer), special=special)
    module = models.causal_lm(cfg)
    template = common.prompt_template(config, tokenizer)
    max_length = int(config.data.max_length)

    train_examples = load_examples(config, config.data.train_split, template)
    common.check_responses_fit(config, kind, train_examples, tokenizer, config.data.train_split)
    num_steps = common.num_steps(config, len(train_examples) // batch_size)
    train_iter = pipeline.make_batches(
        kind, train_examples, tokenizer, batch_size=batch_size, max_length=max_length, mesh=mesh, seed=config.seed,
        shuffle=bool(config.data.shuffle), num_epochs=None if config.train.num_steps > 0 else int(config.train.epochs))

    param_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    reference = loading.load_policy(settings, mesh, rules, vocab_size=len(tokenizer), special=special, rng=param_rng)
    frozen, frozen_shardings = {"reference": reference.params}, {"reference": reference.shardings}
    score_fns, extra = None, {}
    if config.stage == "c_dpo":
        score_fns, params, shardings = load_scorers(config, settings, tokenizer, mesh, rules)
        frozen.update(params)
        frozen_shardings.update(shardings)
        extra = {"lagrange": lagrange_lib.init_lagrange(float(group.lambda_init), int(group.episode_cost_window_size))}
    lambda_max = float(group.lambda_max) if group.lambda_max > 0 else None
    policy = roles.policy_fn(cfg)
    loss_fn = dpo_lib.make_loss_fn(policy, config.stage, float(group.beta), float(group.safety_margin), score_fns,
                                   float(group.threshold), float(group.lambda_lr), lambda_max)

    eval_fn = None
    if config.data.eval_split:
        eval_examples = load_examples(config, config.data.eval_split, template)
        common.check_eval_batch(config, len(eval_examples), mesh)

        def make_eval_iter():
            return pipeline.make_batches(kind, eval_examples, tokenizer, batch_size=int(config.data.eval_batch_size),
                                         max_length=max_length, mesh=mesh, shuffle=False, num_epochs=1)

        metrics_fn = dpo_lib.make_metrics_fn(policy, config.stage, float(group.beta), float(group.safety_margin),
                                             score_fns)

        def loss_and_metrics(params, batch, extra, frozen):
            loss, metrics = metrics_fn(params, batch, extra, frozen)
            return dict(metrics, loss=loss)

        eval_fn = loop.make_eval_fn(loss_and_metrics, make_eval_iter, int(config.train.eval_batches), mesh, rules)

    optimizer = common.optimizer_settings(config)
    tx = optim.make_optimizer(optimizer, num_steps)
    abstract = state_lib.abstract_train_state(loading.init_fn(module), tx, mesh, rules, extra)

    def init_state() -> state_lib.TrainState:
        placed = loading.load_policy(settings, mesh, rules, vocab_size=len(tokenizer), special=special, rng=param_rng)
        return state_lib.init_train_state(placed.params, tx, state_rng, abstract, extra)

    log.info("%s: %d pairs, %d updates of %d x %d pairs, beta %g", config.stage, len(train_examples), num_steps,
             config.train.grad_accum_steps, batch_size, group.beta)
    result = loop.train(
        settings=common.loop_settings(config, num_steps, config.stage), workdir=workdir, mesh=mesh, rules=rules,
        tx=tx, loss_fn=loss_fn, abstract_state=abstract, init_state=init_state, train_iter=train_iter,
        eval_fn=eval_fn, schedule=optim.make_schedule(optimizer, num_steps), frozen=frozen,
        frozen_shardings=frozen_shardings,
    )
    common.export_once(result, workdir, lambda out: loading.export_policy(out, cfg, result.state.params, tokenizer))
    return result
