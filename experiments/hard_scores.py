"""What the reward and cost models of the hard pipeline say about each slice of the hard variant.

    python experiments/hard_scores.py --dir out/hard --seeds 0 [--split test] [--answers judge_sft]

Scores every response of the split (or, with --answers NAME, the answers of DIR/seed<s>/NAME/answers.jsonl
that the judge sampled) with DIR/seed<s>/{reward,cost}_tiny/export (jaxalign.evaluate.arena.score_answers),
groups them by (slice, exact-judge label, opening sentences before the content) and prints, per
group, the answers, mean reward, mean cost and the share the cost model calls unsafe (cost > 0).
Writes DIR/scores_<split or NAME>.json. It explains where a constrained policy's trade-off comes
from: e.g. whether look-alike helpful answers cost more than refusals, or late harm less than early harm.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import numpy as np


def _responses(directory: pathlib.Path, split: str, answers: str, seed: str) -> tuple[list[str], list[str]]:
    """(prompts, texts): every response of the split, or the judge's sampled answers."""
    if answers:
        path = directory / f"seed{seed}" / answers / "answers.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return [r["prompt"] for r in records], [r["answer"] for r in records]
    from jaxalign.data import sources

    rows, _ = sources.read_split(str(directory / "data"), "default", split)
    return ([row["prompt"] for row in rows for _ in (0, 1)],
            [row[f"response_{i}"] for row in rows for i in (0, 1)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="experiments/hard.sh's OUT")
    parser.add_argument("--seeds", nargs="+", default=["0"])
    parser.add_argument("--split", default="test")
    parser.add_argument("--answers", default="", help="a judge dir name under seed<s>/ (its answers.jsonl)")
    parser.add_argument("--max-length", type=int, default=96)
    args = parser.parse_args(argv)
    from jaxalign.data import hard
    from jaxalign.evaluate import arena, judge
    from jaxalign.models import loading
    from jaxalign.models.tokenizer import load_tokenizer
    from jaxalign.parallel import mesh as mesh_lib

    directory = pathlib.Path(args.dir)
    settings = mesh_lib.MeshSettings()
    mesh, rules = mesh_lib.make_mesh(settings), mesh_lib.axis_rules(settings)
    result = {}
    for seed in args.seeds:
        prompts, texts = _responses(directory, args.split, args.answers, seed)
        scored = {}
        for kind in ("reward", "cost"):
            path = str(directory / f"seed{seed}" / f"{kind}_tiny" / "export")
            model = loading.load_score_model(path, mesh, rules, loading.ModelSettings())
            scored[kind] = np.asarray(arena.score_answers(model.module, model.params, load_tokenizer(path), prompts,
                                                          texts, mesh, rules, batch_size=32,
                                                          max_length=args.max_length))
        groups = collections.defaultdict(list)
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            info = judge.prompt_info(prompt)
            groups[(info.slice, judge.classify(text, prompt), hard.opening_turn(text))].append(i)
        table = {}
        for (slice_name, label, turn), index in sorted(groups.items()):
            cost, reward = scored["cost"][index], scored["reward"][index]
            table[f"{slice_name}/{label}/turn{turn}"] = {"n": len(index), "reward": float(reward.mean()),
                                                         "cost": float(cost.mean()),
                                                         "cost_positive": float(np.mean(cost > 0))}
        result[seed] = table
        print(f"seed {seed}: {'slice/label/turn':44s} {'n':>5s} {'reward':>8s} {'cost':>8s} {'cost>0':>7s}")
        for key, row in table.items():
            print(f"  {key:50s} {row['n']:5d} {row['reward']:8.2f} {row['cost']:8.2f} {row['cost_positive']:7.2f}")
    name = args.answers or args.split
    (directory / f"scores_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {directory}/scores_{name}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
