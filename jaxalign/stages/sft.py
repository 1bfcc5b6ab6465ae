"""SFT stage (config.stage "sft"): a causal LM on prompt + response with the response-only loss.

mesh -> tokenizer (missing <pad>/<s>/</s>/<unk> added) -> the policy on the mesh (HF dir or random
init; new vocabulary rows = mean of the old) -> SFT examples of the rows -> sharded batches ->
the one loop -> WORKDIR/export (HF config.json + safetensors + tokenizer files).

With config.lora.rank > 0 the policy is the frozen base (loaded once, passed to every step as
`frozen`, never checkpointed) plus adapters: the train state (and every checkpoint) holds only the
adapters and their optimizer moments; the export is the merged model (or the adapters, see
config.lora.export).
"""

from __future__ import annotations

import logging
import pathlib

import jax

from jaxalign import models
from jaxalign.data import pipeline, views
from jaxalign.models import loading, lora
from jaxalign.objectives import sft
from jaxalign.stages import common
from jaxalign.train import loop, optim, state as state_lib

log = logging.getLogger(__name__)


def sft_examples(config, split: str, template) -> views.Examples:
    rows, _ = common.read_rows(config, split)
    examples = views.sft_examples(rows, template=template, response=config.sft.response)
    log.info("%s: %d rows -> %d SFT examples", split, len(rows), len(examples))
    return examples


def run(config, workdir) -> loop.LoopResult:
    """Trains the SFT stage in `workdir` (resuming if it holds checkpoints) and exports the policy."""
    workdir = pathlib.Path(workdir)
    mesh, rules = common.mesh_and_rules(config)
    batch_size = common.check_batch_size(config, mesh)
    tokenizer = common.load_tokenizer(config)
    settings = common.model_settings(config)
    cfg = loading.model_config(settings, vocab_size=len(tokenizer), special=loading.special_ids(tokenizer))
    lora_settings = common.lora_settings(config)
    common.lora_export(config)  # a bad export kind fails before training
    module = models.causal_lm(cfg)
    trained_module = lora.wrap(module, lora_settings) if lora_settings.enabled else module
    template = common.prompt_template(config, tokenizer)
    train_examples = sft_examples(config, config.data.train_split, template)
    common.check_responses_fit(config, "sft", train_examples, tokenizer, config.data.train_split)
    num_steps = common.num_steps(config, len(train_examples) // batch_size)
    train_iter = pipeline.make_batches(
        "sft", train_examples, tokenizer, batch_size=batch_size, max_length=int(config.data.max_length),
        mesh=mesh, seed=config.seed, shuffle=bool(config.data.shuffle), num_epochs=None,
    )
    eval_fn = None
    if config.data.eval_split:
        eval_examples = sft_examples(config, config.data.eval_split, template)
        common.check_eval_batch(config, len(eval_examples), mesh)
        common.check_responses_fit(config, "sft", eval_examples, tokenizer, config.data.eval_split)

        def make_eval_iter():
            return pipeline.make_batches(
                "sft", eval_examples, tokenizer, batch_size=int(config.data.eval_batch_size),
                max_length=int(config.data.max_length), mesh=mesh, shuffle=False, num_epochs=1,
            )

        metrics_fn = sft.make_metrics_fn(trained_module)
        if lora_settings.enabled:
            metrics_fn = lora.on_base(metrics_fn, cfg.compute_dtype)
        eval_fn = loop.make_eval_fn(metrics_fn, make_eval_iter, int(config.train.eval_batches), mesh, rules)

    optimizer = common.optimizer_settings(config)
    tx = optim.make_optimizer(optimizer, num_steps)
    param_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))

    def load_policy() -> loading.Placed:
        return loading.load_policy(settings, mesh, rules, vocab_size=len(tokenizer),
                                   special=loading.special_ids(tokenizer), rng=param_rng)

    loss_fn = sft.make_loss_fn(trained_module)
    frozen = frozen_shardings = None
    if lora_settings.enabled:  # trained: the adapters; frozen: the base (loaded now, also on a resume)
        base = load_policy()
        frozen, frozen_shardings = base.params, base.shardings
        loss_fn = lora.on_base(loss_fn, cfg.compute_dtype)
        abstract = state_lib.abstract_train_state(lora.adapter_init_fn(module, lora_settings), tx, mesh, rules)
        log.info("LoRA rank %d on %s: %d trained of %d parameters", lora_settings.rank,
                 ",".join(lora_settings.targets), sum(x.size for x in jax.tree.leaves(abstract.params)),
                 sum(x.size for x in jax.tree.leaves(frozen)))

        def init_state() -> state_lib.TrainState:
            adapters, _ = lora.init_adapters(module, lora_settings, jax.random.fold_in(param_rng, 1), mesh, rules)
            return state_lib.init_train_state(adapters, tx, state_rng, abstract)
    else:
        abstract = state_lib.abstract_train_state(loading.init_fn(module), tx, mesh, rules)

        def init_state() -> state_lib.TrainState:
            return state_lib.init_train_state(load_policy().params, tx, state_rng, abstract)

    log.info("SFT: %d examples, %d updates of %d x %d sequences", len(train_examples), num_steps,
             config.train.grad_accum_steps, batch_size)
    result = loop.train(
        settings=common.loop_settings(config, num_steps, "sft"), workdir=workdir, mesh=mesh, rules=rules, tx=tx,
        loss_fn=loss_fn, abstract_state=abstract, init_state=init_state, train_iter=train_iter,
        eval_fn=eval_fn, schedule=optim.make_schedule(optimizer, num_steps), frozen=frozen,
        frozen_shardings=frozen_shardings,
    )
    if lora_settings.enabled:
        export = lambda out: loading.export_lora_policy(  # noqa: E731
            out, cfg, frozen, result.state.params, lora_settings, tokenizer, common.lora_export(config),
            base_model=settings.init_path)
    else:
        export = lambda out: loading.export_policy(out, cfg, result.state.params, tokenizer)  # noqa: E731
    common.export_once(result, workdir, export)
    return result
