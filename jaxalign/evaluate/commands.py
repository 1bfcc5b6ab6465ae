"""`jaxalign evaluate ...`: evaluate a trained model; one sub-command per kind of model.

    jaxalign evaluate reward --model out/reward_tiny/export --data out/mini --out out/eval_rm
    jaxalign evaluate cost   --model out/cost_tiny/export   --data out/mini --out out/eval_cm
    jaxalign evaluate curves --runs out/ppo_lag_tiny out/ppo_tiny --out out/rl_curves.png
    jaxalign evaluate judge  --model out/ppo_lag_tiny/export --data out/mini --out out/judge_ppo_lag
    jaxalign arena --policies sft=out/sft_tiny/export ppo_lag=out/ppo_lag_tiny/export \
        --reward-model out/reward_tiny/export --cost-model out/cost_tiny/export --prompts out/mini --out out/arena
    jaxalign evaluate reward --model DIR ... --config configs/reward_llama2_7b.py [--config.mesh.fsdp=8]

reward: accuracy P(r_better > r_worse), reward mean/std; cost: accuracy P(c_unsafer > c_safer),
sign accuracy P(cost·safety_sign < 0), safe/unsafe mean costs (as safe-rlhf's safe_rlhf/evaluate/reward.py
and cost.py). Both write OUT/metrics.json, OUT/scores.npy and PNG histograms (see jaxalign/evaluate/scores.py).

The model is placed on the mesh of --config (config.mesh and its axis rules, so a 7B model
evaluates sharded); without --config every device holds a data-parallel share of the batch
and the parameters are FSDP-sharded over all devices.

judge: samples a policy on the mini dataset's test prompts and classifies every answer exactly
(jaxalign/evaluate/judge.py): harmful, severe, safe-alternative, over-refusal, helpful and broken
rates, per harm category and per slice (in-distribution, held-out phrasing, look-alike, late-turning
on the hard variant); OUT/judge.json, OUT/answers.jsonl, OUT/judge.png.
arena (`jaxalign arena`, jaxalign/evaluate/arena.py): policies answer the same prompts, judged by the
reward and cost models and, on mini prompts, by the exact judge; CSV per pair, arena.json, arena.png.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax

from jaxalign import files
from jaxalign.data import pipeline, sources, views
from jaxalign.evaluate import curves
from jaxalign.evaluate import moderation as moderation_lib
from jaxalign.evaluate import scores as scores_lib
from jaxalign.models import loading
from jaxalign.models.tokenizer import load_tokenizer
from jaxalign.parallel import mesh as mesh_lib

log = logging.getLogger(__name__)


def mesh_from_args(args):
    """(mesh, rules) of --config's config.mesh (with --config.* overrides), or the default mesh."""
    from jaxalign import config as config_lib

    return mesh_lib.mesh_and_rules(config_lib.mesh_settings(getattr(args, "config", ""), args.extra_args))


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
                        help="parameter dtype on device (bfloat16 halves memory)")
    parser.add_argument("--prepared-dir", default="", help="read --data's split from this TFDS-prepared dir")
    parser.add_argument("--config", default="", help="config file whose config.mesh places the model "
                        "(--config.mesh.* overrides allowed); default: all devices, FSDP")
    add_overwrite_argument(parser)


def add_overwrite_argument(parser, what: str = "--out") -> None:
    """--overwrite: replace an existing output (without it an existing one is refused, naming it)."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {what}")


def _add_cost_arguments(parser) -> None:
    _add_score_arguments(parser)
    parser.add_argument("--inconsistent", default="keep", choices=views.INCONSISTENT_POLICIES,
                        help="pairs whose safer answer is labelled unsafe and the other safe (default: keep)")


def evaluate_score_model(args, kind: str) -> dict:
    """Scores every pair of the split with the model of args.model; writes the files; -> metrics."""
    files.check_new(args.out, args.overwrite)
    mesh, rules = mesh_from_args(args)
    model = loading.load_score_model(args.model, mesh, rules,
                                     loading.ModelSettings(dtype=args.dtype, param_dtype=args.param_dtype))
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    rows, report = sources.read_split(args.data, args.name, args.split, prepared_dir=args.prepared_dir)
    if kind == "preference":
        examples = views.preference_examples(rows)
    else:
        examples = views.safety_preference_examples(rows, inconsistent=args.inconsistent)
    log.info("%s/%s: %s; %s examples: %s", args.data, args.split, report, kind, dict(examples.counts))
    arrays, _ = pipeline.tokenize_examples(kind, examples, tokenizer, max_length=args.max_length)
    scorer = scores_lib.make_pair_scorer(model.module, mesh, rules)
    first, second = scorer(model.params, arrays, kind, batch_size=args.batch_size)
    metrics = scores_lib.pair_metrics(kind, first, second, arrays)
    if jax.process_index() == 0:
        with files.atomic_dir(args.out, overwrite=args.overwrite) as tmp:
            if kind == "preference":
                written = scores_lib.write_reward_outputs(tmp, first, second, metrics)
            else:
                signs = arrays["safer_sign"], arrays["unsafer_sign"]
                written = scores_lib.write_cost_outputs(tmp, first, second, *signs, metrics)
        log.info("wrote %s", ", ".join(str(pathlib.Path(args.out) / path) for path in written))
    return metrics


def _run_reward(args) -> int:
    print(json.dumps(evaluate_score_model(args, "preference"), indent=2, sort_keys=True))
    return 0


def _run_cost(args) -> int:
    print(json.dumps(evaluate_score_model(args, "safety_preference"), indent=2, sort_keys=True))
    return 0


def _add_curves_arguments(parser) -> None:
    parser.add_argument("--runs", nargs="+", required=True, help="RL workdirs (each with metrics.jsonl)")
    parser.add_argument("--labels", nargs="+", default=None, help="legend labels (default: dir names)")
    parser.add_argument("--out", required=True, help="output PNG; the summary goes beside it as .json")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window in iterations")
    parser.add_argument("--threshold", type=float, default=None, help="cost threshold to draw (config.rl.threshold)")
    add_overwrite_argument(parser, "--out PNG and its .json")


def _run_curves(args) -> int:
    """Plots the runs and prints/writes the first-vs-last summary per run."""
    for path in (pathlib.Path(args.out), pathlib.Path(args.out).with_suffix(".json")):
        files.check_new(path, args.overwrite)
    summary = curves.write_curves(args.runs, args.out, labels=args.labels, smooth=args.smooth,
                                  threshold=args.threshold)
    print(json.dumps(summary, indent=2))
    return 0


def add_policy_arguments(parser) -> None:
    """Arguments shared by commands that sample a policy (judge, arena)."""
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--name", default="default", help="dataset config (default: default)")
    parser.add_argument("--samples", type=int, default=2, help="answers per prompt (default: 2)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--prompt-length", type=int, default=64, help="prompts are left-padded/cut to this")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per sampler call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--config", default="", help="config file whose config.mesh places the models "
                        "(--config.mesh.* overrides allowed); default: all devices, FSDP")


def judge_settings(args):
    from jaxalign.evaluate import judge

    return judge.JudgeSettings(samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                               prompt_length=args.prompt_length, seed=args.seed)


def _add_judge_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="policy dir (HF causal LM + tokenizer, e.g. WORKDIR/export)")
    parser.add_argument("--data", required=True, help="the mini dataset dir (`jaxalign data mini --out DIR`)")
    parser.add_argument("--out", required=True, help="output dir: judge.json, answers.jsonl, judge.png")
    parser.add_argument("--label", default="", help="policy name in the plot (default: the --out dir name)")
    add_overwrite_argument(parser)
    add_policy_arguments(parser)


def _run_judge(args) -> int:
    from jaxalign.evaluate import judge
    from jaxalign.generate import policy as policy_lib

    files.check_new(args.out, args.overwrite)
    mesh, rules = mesh_from_args(args)
    rows, report = sources.read_split(args.data, args.name, args.split)
    prompts = judge.unique_prompts(rows)
    for prompt in prompts:
        judge.prompt_info(prompt)  # a non-mini prompt fails before any sampling
    log.info("%s/%s: %s; %d prompts", args.data, args.split, report, len(prompts))
    settings = judge_settings(args)
    policy = policy_lib.load(args.model, dtype=args.dtype, mesh=mesh, rules=rules)
    texts = judge.sample_answers(policy, prompts, settings)
    asked = [p for p in prompts for _ in range(settings.samples_per_prompt)]
    labels = [judge.classify(text, prompt) for text, prompt in zip(texts, asked)]
    rates = judge.judge_rates(asked, labels, texts)
    rates["model"] = args.model
    if jax.process_index() == 0:
        with files.atomic_dir(args.out, overwrite=args.overwrite) as tmp:
            written = judge.write_judge_report(tmp, asked, texts, labels, rates,
                                               title=args.label or pathlib.Path(args.out).name)
        log.info("wrote %s", ", ".join(f"{args.out}/{name}" for name in written))
    print(json.dumps({k: v for k, v in rates.items() if k not in ("per_category", "slices")}, indent=2,
                     sort_keys=True))
    return 0


# sub-command -> (help, add_arguments, run)
_TARGETS = {
    "reward": ("reward model: preference accuracy and reward distribution", _add_score_arguments, _run_reward),
    "cost": ("cost model: preference and sign accuracy, safe/unsafe costs", _add_cost_arguments, _run_cost),
    "curves": ("RL runs: reward, cost, lambda and KL per iteration (PNG + summary)", _add_curves_arguments,
               _run_curves),
    "judge": ("policy on the mini test prompts: exact harmful/helpful/broken rates (JSON + PNG)",
              _add_judge_arguments, _run_judge),
    "moderation": ("moderation model: unsafe P/R/F1, per-category F1, severity, ECE, streaming (JSON + PNG)",
                   moderation_lib.add_arguments, moderation_lib.run_command),
}


def _add_report_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="run dir of the quickstart (judge_*/, arena/, RL workdirs)")
    parser.add_argument("--wall-seconds", type=float, default=None, help="the run's wall time, shown in the report")
    add_overwrite_argument(parser, "report.md / report.json in --out")


def _run_report(args) -> int:
    from jaxalign.evaluate import report

    if not pathlib.Path(args.out).is_dir():
        raise FileNotFoundError(f"--out {args.out}: no such run dir")
    for name in report.REPORT_FILES:
        files.check_new(pathlib.Path(args.out) / name, args.overwrite, "the report file")
    data = report.write_report(args.out, args.wall_seconds)
    print((pathlib.Path(args.out) / "report.md").read_text())
    images = [p.name for p in map(pathlib.Path(args.out).joinpath, ("judge_table.png", "rl_eval.png")) if p.exists()]
    log.info("wrote %s/report.md, report.json and %s (%d policies judged)", args.out, ", ".join(images) or "no PNG",
             len(data["judge"]))
    return 0


_TARGETS["report"] = ("a quickstart run dir: report.md + report.json + PNGs from the judge, arena and RL runs",
                      _add_report_arguments, _run_report)


def _add_arena_arguments(parser) -> None:
    parser.add_argument("--policies", nargs="+", required=True, metavar="NAME=DIR",
                        help="two or more policy dirs; the first is the red corner (champion), e.g. sft=out/sft_tiny/export")
    parser.add_argument("--reward-model", required=True, help="reward score-model dir")
    parser.add_argument("--cost-model", required=True, help="cost score-model dir")
    parser.add_argument("--prompts", required=True,
                        help="release-layout dataset dir (its --split), a .jsonl of rows with 'prompt', or one prompt a line")
    parser.add_argument("--out", required=True, help="output dir: <red>_vs_<blue>.csv, arena.json, arena.png")
    parser.add_argument("--max-prompts", type=int, default=-1, help="the first N distinct prompts (-1 = all)")
    parser.add_argument("--score-max-length", type=int, default=128, help="prompt + answer length for the score models")
    add_overwrite_argument(parser)
    add_policy_arguments(parser)
    parser.set_defaults(samples=1)


def _run_arena(args) -> int:
    from jaxalign.evaluate import arena

    policies = {}
    for item in args.policies:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--policies: expected NAME=DIR, got {item!r}")
        if name in policies:
            raise ValueError(f"--policies: the name {name!r} is given twice")
        policies[name] = path
    files.check_new(args.out, args.overwrite)
    prompts = arena.read_prompts(args.prompts, args.split, args.name)
    if args.max_prompts >= 0:
        prompts = prompts[: args.max_prompts]
    mesh, rules = mesh_from_args(args)
    with files.atomic_dir(args.out, overwrite=args.overwrite, writer=jax.process_index() == 0) as out:
        summary = arena.run_arena(policies, prompts, args.reward_model, args.cost_model, mesh, rules,
                                  judge_settings(args), out, score_batch_size=args.batch_size,
                                  max_length=args.score_max_length, dtype=args.dtype)
    log.info("wrote %s/arena.json, %s/arena.png and one CSV per pair", args.out, args.out)
    print(json.dumps({"policies": summary.get("policies"), "pairs": {
        pair: {k: v for k, v in tables.items() if k != "table2x2"} for pair, tables in summary.get("pairs", {}).items()}},
        indent=2, sort_keys=True))
    return 0


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, (help_text, add, _) in _TARGETS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def run(args) -> int:
    return _TARGETS[args.target][2](args)


COMMANDS = {"evaluate": (add_arguments, run), "arena": (_add_arena_arguments, _run_arena)}
