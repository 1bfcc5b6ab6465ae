"""The PTX examples of the RL actor: the SFT term of its update, 0.5*(g_RL + ptx_coeff*g_PTX)
(upstream safe-rlhf/safe_rlhf/trainers/rl_trainer.py ptx_step, which imitates Alpaca).

    examples = ptx.ptx_examples(rows, template, "safe_better")   # views.Examples of kind "sft"

Here the examples come from the safety data itself, and what they imitate is chosen (config.rl.ptx_response):
    safe_only    every response labelled safe (both of a row when both are)
    safe_better  per row the more helpful of its responses labelled safe (rows without one skipped)
    safer | better | both   views.sft_examples(response=...) (both imitates unsafe answers too)
"""

from __future__ import annotations

from typing import Iterable

from jaxalign.data import views

PTX_RESPONSES = ("safe_only", "safe_better", "safer", "better", "both")


def ptx_examples(rows: Iterable[dict], template: views.Template, response: str,
                 field: str = "config.rl.ptx_response") -> views.Examples:
    """The PTX SFT examples (prompt, response) of release rows; .counts says what was kept and
    skipped. ValueError naming `field` for an unknown `response` or when nothing is left."""
    if response not in PTX_RESPONSES:
        raise ValueError(f"{field}: expected one of {PTX_RESPONSES}, got {response!r}")
    if response == "safe_better":
        out = views.Examples("sft")
        for row in rows:
            better = int(row["better_response_id"])
            safe = [i for i in (better, 1 - better) if row[f"is_response_{i}_safe"]]
            if safe:
                prompt = views.format_prompt(row["prompt"], template)
                out.append({"prompt": prompt, "response": row[f"response_{safe[0]}"]})
            else:
                out.counts["skipped_no_safe"] += 1
        out.counts["kept"] = len(out)
    elif response == "safe_only":
        qa = views.qa_examples(rows, template=template)
        out = views.Examples("sft", ({"prompt": e["prompt"], "response": e["response"]} for e in qa if e["is_safe"]))
        out.counts.update(kept=len(out), skipped_unsafe=len(qa) - len(out))
    else:
        return views.sft_examples(rows, template=template, response=response)
    if not out:
        raise ValueError(f"{field}={response!r}: the PTX data has no response labelled safe")
    return out
