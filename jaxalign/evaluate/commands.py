"""`jaxalign evaluate ...`: evaluate a trained model; one sub-command per kind of model.

    jaxalign evaluate reward --model out/reward_tiny/export --data out/mini --out out/eval_rm
    jaxalign evaluate cost   --model out/cost_tiny/export   --data out/mini --out out/eval_cm
    jaxalign evaluate curves --runs out/ppo_lag_tiny out/ppo_tiny --out out/rl_curves.png

reward: accuracy P(r_better > r_worse), reward mean/std; cost: accuracy P(c_unsafer > c_safer),
sign accuracy P(cost·safety_sign < 0), safe/unsafe mean costs (spec §7.2). Both write
OUT/metrics.json, OUT/scores.npy and PNG histograms (see jaxalign/evaluate/scores.py).

New evaluations (e.g. a policy arena) are added to `_TARGETS` with their own
add-arguments and run functions.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import ml_collections

from jaxalign.data import pipeline, pku_saferlhf, views
from jaxalign.evaluate import curves
from jaxalign.evaluate import scores as scores_lib
from jaxalign.models import score
from jaxalign.models.tokenizer import load_tokenizer
from jaxalign.parallel import mesh as mesh_lib

# Evaluation is data parallel: parameters replicated on every device, batches split.
_MESH = dict(data=-1, fsdp=1, tensor=1)
_AXIS_RULES = (("batch", ("data", "fsdp")),)

log = logging.getLogger(__name__)


def _add_score_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="score-model dir (e.g. WORKDIR/export of a reward/cost run)")
    parser.add_argument("--data", required=True, help="release-layout dataset dir (data/<Model>/{train,test}.jsonl)")
    parser.add_argument("--out", required=True, help="output dir: metrics.json, scores.npy, *.png")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--name", default="default", help="dataset config: default, alpaca-7b, ... (default: default)")
    parser.add_argument("--tokenizer", default="", help="tokenizer dir (default: the model dir)")
    parser.add_argument("--max-length", type=int, default=512, help="pad/cut every sequence to this length")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward (2x sequences)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter dtype on device (bfloat16 halves memory; parameters are replicated)")


def _add_cost_arguments(parser) -> None:
    _add_score_arguments(parser)
    parser.add_argument("--inconsistent", default="keep", choices=views.INCONSISTENT_POLICIES,
                        help="pairs whose safer answer is labelled unsafe and the other safe (default: keep)")


def evaluate_score_model(args, kind: str) -> dict:
    """Scores every pair of the split with the model of args.model; writes the files; -> metrics."""
    cfg, head, host_params, _ = score.load_score_model(
        args.model, dtype=args.dtype, on_host=True, param_dtype=args.param_dtype
    )
    model = head.model(cfg)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    rows, report = pku_saferlhf.read_release(args.data, args.name, args.split)
    if kind == "preference":
        examples = views.preference_examples(rows)
    else:
        examples = views.safety_preference_examples(rows, inconsistent=args.inconsistent)
    log.info("%s/%s: %s; %s examples: %s", args.data, args.split, report, kind, dict(examples.counts))
    arrays, _ = pipeline.tokenize_examples(kind, examples, tokenizer, max_length=args.max_length)

    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(_MESH))
    rules = _AXIS_RULES
    with mesh_lib.sharding_context(mesh, rules):
        init = lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["params"]  # noqa: E731
        boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
        shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
    params = jax.tree.map(mesh_lib.put_sharded, host_params, shardings)
    first, second = scores_lib.score_pairs(
        model, params, arrays, kind, batch_size=args.batch_size, mesh=mesh, rules=rules
    )
    metrics = scores_lib.pair_metrics(kind, first, second, arrays)
    if jax.process_index() == 0:
        if kind == "preference":
            scores_lib.write_reward_outputs(args.out, first, second, metrics)
        else:
            signs = arrays["safer_sign"], arrays["unsafer_sign"]
            scores_lib.write_cost_outputs(args.out, first, second, *signs, metrics)
    return metrics


def _run_reward(args) -> int:
    print(json.dumps(evaluate_score_model(args, "preference"), indent=2, sort_keys=True))
    return 0


def _run_cost(args) -> int:
    print(json.dumps(evaluate_score_model(args, "safety_preference"), indent=2, sort_keys=True))
    return 0


# sub-command -> (help, add_arguments, run)
_TARGETS = {
    "reward": ("reward model: preference accuracy and reward distribution", _add_score_arguments, _run_reward),
    "cost": ("cost model: preference and sign accuracy, safe/unsafe costs", _add_cost_arguments, _run_cost),
    "curves": ("RL runs: reward, cost, lambda and KL per iteration (PNG + summary)", curves.add_arguments, curves.run),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, (help_text, add, _) in _TARGETS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def run(args) -> int:
    try:
        return _TARGETS[args.target][2](args)
    except (score.ScoreModelError, ValueError, FileNotFoundError) as error:
        log.error("%s", error)
        return 1
