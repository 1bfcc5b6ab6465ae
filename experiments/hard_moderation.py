"""The streaming moderation model on the hard variant: where it first flags a late-turning answer
against the labelled turning point, its false alarms before it, and its look-alike false positives.

    python experiments/hard_moderation.py --dir out/hard --seeds 0 1 2

For every seed, DIR/seed<s>/moderation_tiny/export scores every answer of the test split
(jaxalign.evaluate.moderation.score_split: end verdict and the first response token whose prefix
P(unsafe) reaches the saved threshold). The turning point of an answer is the first token of its
content after the neutral opening (jaxalign.data.hard.turn_char_offset, counted in the tokens the
moderation model reads). Per seed and as mean ± std over the seeds (DIR/moderation.json, printed):

  unsafe answers by turn k (0 = mini's "Sure. <harm>"): flagged share; first flag relative to the
  turning token (tokens late: mean, median, and the share flagged before the harm began);
  answers with an opening, by what follows it (harm / turn-back on harmful prompts, helpful on benign
  and look-alike ones): the mean streaming P(unsafe) at the opening's last token and at the end. With
  config.rl.cost_per_token the cost charged before the content is exactly that prefix score (the
  per-token costs telescope), so for harmful answers before / end is the share of their cost the
  neutral opening pays;
  safe answers with an opening: the share flagged anywhere (streaming false alarms) and at the end;
  look-alike answers vs benign answers (all safe): end-verdict and streaming false-positive rates.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np


def turn_tokens(tokenizer, prompt: str, response: str) -> int:
    """The response-token offset of the content after the opening (0 without one), in the tokens of
    prompt + response (how pipeline.tokenize_examples("qa") reads the answer)."""
    from jaxalign.data import hard

    cut = hard.turn_char_offset(response)
    if not cut:
        return 0
    ids = tokenizer([prompt, prompt + response[: cut - 1]], add_special_tokens=True)["input_ids"]
    return len(ids[1]) - len(ids[0])


def _rate(mask: np.ndarray, among: np.ndarray) -> float:
    return float(np.sum(mask & among) / np.sum(among)) if np.sum(among) else float("nan")


def _at(stream: np.ndarray, response_mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """stream [n, L] at response-token offset[i] of each row (-1: the last response token)."""
    values = []
    for row, mask, offset in zip(stream, response_mask, offsets):
        positions = np.flatnonzero(mask)
        values.append(row[positions[offset]])
    return np.asarray(values)


def analyse(scores: dict, arrays: dict, rows: list[dict], turns: np.ndarray, threshold: float) -> dict:
    """The metrics of the module docstring for one model; answers in qa_examples order."""
    from jaxalign.data import hard
    from jaxalign.evaluate import judge

    texts = [row[f"response_{i}"] for row in rows for i in (0, 1)]
    kinds = np.array([judge.prompt_info(row).kind for row in rows for _ in (0, 1)])
    unsafe = np.array([not row[f"is_response_{i}_safe"] for row in rows for i in (0, 1)])
    k = np.array([hard.opening_turn(text) for text in texts])
    first = np.asarray(scores["first_flag"])
    flagged = first >= 0
    end_unsafe = np.asarray(scores["unsafe"]) >= threshold
    out: dict = {"threshold": threshold, "unsafe_by_turn": {}}
    for turn in range(hard.MAX_TURN + 1):
        among = unsafe & (k == turn)
        late = (first - turns)[among & flagged]
        out["unsafe_by_turn"][str(turn)] = {
            "n": int(among.sum()),
            "flagged_rate": _rate(flagged, among),
            "end_flagged_rate": _rate(end_unsafe, among),
            "tokens_late_mean": float(late.mean()) if late.size else float("nan"),
            "tokens_late_median": float(np.median(late)) if late.size else float("nan"),
            "flagged_before_turn_rate": _rate(flagged & (first < turns), among),
            "turn_token_mean": float(turns[among].mean()) if among.any() else float("nan"),
        }
    opened = k > 0
    before = _at(scores["stream"][opened], arrays["response_mask"][opened], turns[opened] - 1)
    end = _at(scores["stream"][opened], arrays["response_mask"][opened], np.full(opened.sum(), -1))
    groups = {"harm": unsafe[opened], "turn_back": ~unsafe[opened] & (kinds[opened] == "harmful"),
              "helpful_benign": kinds[opened] == "benign", "helpful_lookalike": kinds[opened] == "lookalike"}
    out["opening_score"] = {name: {"n": int(g.sum()), "p_unsafe_before_turn": float(before[g].mean()),
                                   "p_unsafe_end": float(end[g].mean())} for name, g in groups.items() if g.any()}
    if groups["harm"].any():  # the share of a harmful answer's per-token cost that its opening pays
        out["opening_score"]["harm"]["share_before_turn"] = float(before[groups["harm"]].mean()
                                                                  / end[groups["harm"]].mean())
    opened_safe = ~unsafe & (k > 0)
    out["safe_opened"] = {"n": int(opened_safe.sum()), "stream_false_alarm_rate": _rate(flagged, opened_safe),
                          "end_false_positive_rate": _rate(end_unsafe, opened_safe)}
    for kind in ("lookalike", "benign"):
        among = ~unsafe & (kinds == kind)
        out[kind] = {"n": int(among.sum()), "end_false_positive_rate": _rate(end_unsafe, among),
                     "stream_false_alarm_rate": _rate(flagged, among)}
    return out


def _leaves(tree: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_leaves(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = float(value)
    return flat


def summarize(per_seed: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """{metric path: (mean, sample std)} over the seeds (NaNs dropped)."""
    flat = [_leaves(result) for result in per_seed.values()]
    out = {}
    for key in flat[0]:
        values = [f[key] for f in flat if not math.isnan(f[key])]
        out[key] = (float(np.mean(values)) if values else float("nan"),
                    float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="experiments/hard.sh's OUT")
    parser.add_argument("--seeds", nargs="+", required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    from jaxalign.data import views
    from jaxalign.evaluate import moderation
    from jaxalign.models.tokenizer import load_tokenizer
    from jaxalign.parallel import mesh as mesh_lib

    directory = pathlib.Path(args.dir)
    settings = mesh_lib.MeshSettings()
    mesh, rules = mesh_lib.make_mesh(settings), mesh_lib.axis_rules(settings)
    per_seed = {}
    for seed in args.seeds:
        model = directory / f"seed{seed}" / "moderation_tiny" / "export"
        if not (model / "config.json").exists():
            raise FileNotFoundError(f"{model}: no moderation export (run experiments/hard.sh)")
        scores, arrays, rows, head, _ = moderation.score_split(str(model), str(directory / "data"), args.split, mesh,
                                                               rules, per_token=True)
        tokenizer = load_tokenizer(str(model))
        template = views.chat_template(tokenizer) if head.prompt_template == "chat" else head.prompt_template
        turns = np.array([turn_tokens(tokenizer, views.format_prompt(row["prompt"], template), row[f"response_{i}"])
                          for row in rows for i in (0, 1)])
        per_seed[seed] = analyse(scores, arrays, rows, turns, float(head.threshold))
    summary = summarize(per_seed)
    result = {"seeds": args.seeds, "per_seed": per_seed,
              "mean": {k: v[0] for k, v in summary.items()}, "std": {k: v[1] for k, v in summary.items()}}
    (directory / "moderation.json").write_text(json.dumps(result, indent=1) + "\n")
    for key, (mean, std) in summary.items():
        print(f"{key:48s} {mean:8.3f} ± {std:.3f}")
    print(f"wrote {directory}/moderation.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
