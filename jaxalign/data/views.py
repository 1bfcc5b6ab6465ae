"""Release rows -> the examples each training stage consumes (upstream semantics, spec §2.2-2.5).

Every function takes release-format rows (dicts, see pku_saferlhf.py; a list or a
`PreparedSplit`) and returns `Examples`: a list of plain dicts with formatted prompt text, plus
`.kind` (the pipeline batch kind) and `.counts` (what was kept, skipped and why).

    function                     kind               example keys
    sft_examples                 sft                prompt, response
    preference_examples          preference         prompt, better, worse
    single_preference_examples   preference         prompt, better, worse (single-dimension rows)
    safety_preference_examples   safety_preference  prompt, safer, unsafer, safer_sign, unsafer_sign
    qa_examples                  qa                 prompt, response, is_safe, categories [19], severity
    prompt_examples              prompt             prompt (deduplicated)

`prompt` is already formatted with the template (upstream:
`BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:`); responses are raw, and the pipeline
builds `prompt + response + eos` as upstream does. Pairs whose two responses are identical are
skipped and counted (upstream raises on identical token ids).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

from jaxalign.data.pku_saferlhf import HARM_CATEGORIES

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"
INCONSISTENT_POLICIES = ("error", "skip", "keep")

Template = str | Callable[[str], str]


class Examples(list):
    """A list of example dicts with `.kind` (batch kind) and `.counts` (Counter of kept/skipped)."""

    def __init__(self, kind: str, items: Iterable[dict] = (), counts: Counter | None = None):
        super().__init__(items)
        self.kind = kind
        self.counts = Counter() if counts is None else counts


def format_prompt(text: str, template: Template = PROMPT_TEMPLATE) -> str:
    """Format one user question: a `{input}` template string or a callable."""
    if callable(template):
        return template(text)
    return template.format(input=text)


def chat_template(tokenizer) -> Callable[[str], str]:
    """A template callable that uses the tokenizer's chat template (one user turn + generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; use the default PROMPT_TEMPLATE")

    def apply(text: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    return apply


def _require(row: dict, fields: tuple[str, ...], index: int, view: str) -> None:
    for name in fields:
        if name not in row:
            raise KeyError(f"{view}: row {index} has no field {name!r} (has {sorted(row)}); "
                           f"this view needs {list(fields)}")


def sft_examples(rows: Iterable[dict], *, template: Template = PROMPT_TEMPLATE, response: str = "both") -> Examples:
    """SFT examples (prompt, response).

    response: "both" (two examples per row, every answer), "better" (the more helpful one) or
    "safer" (the more harmless one).
    """
    if response not in ("both", "better", "safer"):
        raise ValueError(f"response must be 'both', 'better' or 'safer', got {response!r}")
    out = Examples("sft")
    for index, row in enumerate(rows):
        needed = ("prompt", "response_0", "response_1") + (() if response == "both" else (f"{response}_response_id",))
        _require(row, needed, index, "sft_examples")
        prompt = format_prompt(row["prompt"], template)
        ids = (0, 1) if response == "both" else (row[f"{response}_response_id"],)
        for i in ids:
            out.append({"prompt": prompt, "response": row[f"response_{i}"]})
    out.counts["kept"] = len(out)
    return out


def preference_examples(rows: Iterable[dict], *, template: Template = PROMPT_TEMPLATE) -> Examples:
    """Helpfulness pairs (prompt, better, worse) from `better_response_id`."""
    out = Examples("preference")
    for index, row in enumerate(rows):
        _require(row, ("prompt", "response_0", "response_1", "better_response_id"), index, "preference_examples")
        b = row["better_response_id"]
        better, worse = row[f"response_{b}"], row[f"response_{1 - b}"]
        if better == worse:
            out.counts["skipped_identical"] += 1
            continue
        out.append({"prompt": format_prompt(row["prompt"], template), "better": better, "worse": worse})
    out.counts["kept"] = len(out)
    return out


def single_preference_examples(rows: Iterable[dict], *, template: Template = PROMPT_TEMPLATE) -> Examples:
    """Single-preference pairs (the single-dimension release: one holistic `better_response_id`)."""
    return preference_examples(rows, template=template)


def safety_preference_examples(
    rows: Iterable[dict], *, template: Template = PROMPT_TEMPLATE, inconsistent: str = "error"
) -> Examples:
    """Harmlessness pairs (prompt, safer, unsafer, safer_sign, unsafer_sign); signs +1 safe, -1 unsafe.

    inconsistent: what to do with a pair whose safer response is labelled unsafe while the other
    is labelled safe (safer_sign < unsafer_sign, safe-rlhf issue #181): "error" raises (upstream),
    "skip" drops it, "keep" keeps it; skipped and kept ones are counted in `.counts`.
    """
    if inconsistent not in INCONSISTENT_POLICIES:
        raise ValueError(f"inconsistent must be one of {INCONSISTENT_POLICIES}, got {inconsistent!r}")
    out = Examples("safety_preference")
    needed = ("prompt", "response_0", "response_1", "safer_response_id", "is_response_0_safe", "is_response_1_safe")
    for index, row in enumerate(rows):
        _require(row, needed, index, "safety_preference_examples")
        s = row["safer_response_id"]
        safer, unsafer = row[f"response_{s}"], row[f"response_{1 - s}"]
        safer_sign = 1 if row[f"is_response_{s}_safe"] else -1
        unsafer_sign = 1 if row[f"is_response_{1 - s}_safe"] else -1
        if safer == unsafer:
            out.counts["skipped_identical"] += 1
            continue
        if safer_sign < unsafer_sign:
            if inconsistent == "error":
                raise ValueError(
                    f"row {index}: the safer response (response_{s}) is labelled unsafe while the other is "
                    f"labelled safe (safe-rlhf #181); pass inconsistent='skip' or 'keep'. prompt={row['prompt']!r:.80}"
                )
            out.counts[f"inconsistent_{'skipped' if inconsistent == 'skip' else 'kept'}"] += 1
            if inconsistent == "skip":
                continue
        out.append({
            "prompt": format_prompt(row["prompt"], template),
            "safer": safer,
            "unsafer": unsafer,
            "safer_sign": safer_sign,
            "unsafer_sign": unsafer_sign,
        })
    out.counts["kept"] = len(out)
    return out


def qa_examples(rows: Iterable[dict], *, template: Template = PROMPT_TEMPLATE) -> Examples:
    """QA rows, two per release row (like the 265k QA set): prompt, response, is_safe,
    categories (19 bools in HARM_CATEGORIES order), severity 0..3."""
    out = Examples("qa")
    for index, row in enumerate(rows):
        prompt = format_prompt(row["prompt"], template)
        for i in (0, 1):
            _require(row, (f"response_{i}", f"is_response_{i}_safe", f"response_{i}_harm_category",
                           f"response_{i}_severity_level"), index, "qa_examples")
            categories = row[f"response_{i}_harm_category"]
            out.append({
                "prompt": prompt,
                "response": row[f"response_{i}"],
                "is_safe": bool(row[f"is_response_{i}_safe"]),
                "categories": [bool(categories[name]) for name in HARM_CATEGORIES],
                "severity": int(row[f"response_{i}_severity_level"]),
            })
    out.counts["kept"] = len(out)
    return out


def prompt_examples(rows: Iterable[dict], *, template: Template = PROMPT_TEMPLATE) -> Examples:
    """Prompt-only examples for RL, deduplicated by prompt text (upstream: last occurrence kept,
    then in index order)."""
    last: dict[str, int] = {}
    total = 0
    for index, row in enumerate(rows):
        _require(row, ("prompt",), index, "prompt_examples")
        last[row["prompt"]] = index
        total += 1
    out = Examples("prompt")
    for text, _ in sorted(last.items(), key=lambda item: item[1]):
        out.append({"prompt": format_prompt(text, template)})
    out.counts["kept"] = len(out)
    out.counts["duplicates_removed"] = total - len(out)
    return out
