"""Evaluation inside the RL loop: the policy answers held-out prompts, the frozen reward and cost
models score the answers, and on the mini dataset the exact judge classifies them.

    eval_fn = make_eval_fn(program.generate, fns.scores, prompts, tokenizer, EvalSettings(...), mesh, rules)
    loop.run(..., eval_fn=eval_fn)      # every LoopSettings.eval_every iterations and at the end: eval/*

Metrics (the loop adds the "eval/" prefix): reward, cost (means over the answers), cost_positive_rate
(answers the cost model calls unsafe, cost > 0), generated_length, and with the judge
judge/<rate> for jaxalign.evaluate.judge.RATE_KEYS. The sampling key is fixed per evaluation, so
every evaluation sees the same prompts and randomness and the training RNG is untouched (resume
stays exact).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from jaxalign.data import pipeline, views
from jaxalign.evaluate import judge
from jaxalign.generate import policy as policy_lib
from jaxalign.models import layer_loop
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.rl.rollout import end_scores

SCORED = ("reward", "cost")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """batch_size and prompt_length must be the rollout's, so the compiled generate step is reused."""

    batch_size: int
    prompt_length: int
    use_judge: bool = False  # classify the answers with the mini dataset's exact judge
    seed: int = 0


def make_eval_fn(generate: Callable, score_fns: Mapping[str, Callable], prompts: Sequence[str], tokenizer,
                 settings: EvalSettings, mesh, rules, template: views.Template = views.PROMPT_TEMPLATE):
    """eval_fn(state, frozen) -> {name: float} for loop.run (state: an RLState; frozen: {role: params}).

    generate: (actor params, prompt_ids [B,S], prompt_mask [B,S], rng, frozen) -> (input_ids [B,S+N],
    attention_mask [B,S+N]) with B = settings.batch_size, S = settings.prompt_length; score_fns:
    {role: ScoreFn}, of which "reward" and "cost" are scored when frozen holds their params;
    prompts: raw user prompts (the template is applied here).
    """
    if not prompts:
        raise ValueError("RL evaluation: no held-out prompts (config.data.eval_split is empty?)")
    examples = views.Examples("prompt", [{"prompt": views.format_prompt(p, template)} for p in prompts])
    arrays, _ = pipeline.tokenize_examples("prompt", examples, tokenizer, max_length=settings.prompt_length)
    in_sharding = mesh_lib.batch_sharding(mesh, 2)
    size = settings.batch_size
    @jax.jit
    def score(frozen, ids, mask):
        with layer_loop.forward_only():
            return {name: end_scores(score_fns[name], frozen[name], ids, mask) for name in frozen}

    def eval_fn(state, frozen: Mapping[str, Any]) -> dict[str, float]:
        scored = {name: frozen[name] for name in SCORED if name in frozen and name in score_fns}
        values: dict[str, list[np.ndarray]] = {name: [] for name in scored}
        lengths, texts = [], []
        rng = jax.random.PRNGKey(settings.seed)
        with mesh_lib.sharding_context(mesh, rules):
            for start in range(0, len(prompts), size):
                rows = np.minimum(np.arange(start, start + size), len(prompts) - 1)
                keep = min(size, len(prompts) - start)
                ids = mesh_lib.put_sharded(arrays["input_ids"][rows], in_sharding)
                mask = mesh_lib.put_sharded(arrays["attention_mask"][rows], in_sharding)
                seq, seq_mask = generate(state.actor.params, ids, mask, jax.random.fold_in(rng, start), frozen)
                # Batch-sharded outputs: every row on every process (device_get alone fails across hosts).
                for name, value in score(scored, seq, seq_mask).items():
                    values[name].append(mesh_lib.global_rows(value)[:keep])
                seq, seq_mask = mesh_lib.global_rows(seq), mesh_lib.global_rows(seq_mask)
                response_mask = np.asarray(seq_mask)[:, settings.prompt_length:]
                lengths.append(response_mask.sum(-1)[:keep])
                if settings.use_judge:
                    texts.extend(policy_lib.decode_responses(tokenizer, seq, response_mask,
                                                             settings.prompt_length)[:keep])
        metrics = {name: float(np.mean(np.concatenate(v))) for name, v in values.items()}
        if "cost" in values:
            metrics["cost_positive_rate"] = float(np.mean(np.concatenate(values["cost"]) > 0))
        metrics["generated_length"] = float(np.mean(np.concatenate(lengths)))
        if settings.use_judge:
            rates = judge.judge_rates(prompts, [judge.classify(t, p) for t, p in zip(texts, prompts)])
            metrics.update({f"judge/{key}": float(rates[key]) for key in judge.RATE_KEYS
                            if not math.isnan(rates[key])})
        return metrics

    return eval_fn
