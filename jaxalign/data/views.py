"""Release rows -> the examples each training stage consumes (the semantics of safe-rlhf's
safe_rlhf/datasets/: raw/safe_rlhf.py, utils.py::format_prompt, the supervised / preference /
safety-preference / prompt-only datasets).

Every function takes release-format rows (dicts, see pku_saferlhf.py; a list or a
`PreparedSplit`) and returns `Examples`: a list of plain dicts with formatted prompt text, plus
`.kind` (the pipeline batch kind) and `.counts` (what was kept, skipped and why).

Given a `PreparedSplit` (random access to a TFDS-prepared ArrayRecord split), a view returns
`LazyExamples` instead: the same examples in the same order with the same `.kind` and `.counts`,
but each built only when indexed. The filtering (identical pairs, #181 pairs, duplicate prompts)
uses the per-row summary stored at prepare time, so building the view reads no record (one, to
check the fields); the pipeline then reads only the records of the rows each process batches.

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
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from jaxalign.data.pku_saferlhf import HARM_CATEGORIES
from jaxalign.data.prepared import PreparedSplit

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"
INCONSISTENT_POLICIES = ("error", "skip", "keep")

Template = str | Callable[[str], str]


class Examples(list):
    """A list of example dicts with `.kind` (batch kind) and `.counts` (Counter of kept/skipped)."""

    def __init__(self, kind: str, items: Iterable[dict] = (), counts: Counter | None = None):
        super().__init__(items)
        self.kind = kind
        self.counts = Counter() if counts is None else counts


class LazyExamples(Sequence):
    """Examples of a view over a `PreparedSplit`, built on access: example j is
    `build(rows[row_ids[j]], variants[j])`. Has `.kind` and `.counts` like `Examples`;
    `read(indices)` builds several with one batched record read."""

    def __init__(self, kind: str, rows: PreparedSplit, row_ids: np.ndarray, variants: np.ndarray,
                 build: Callable[[dict, int], dict], counts: Counter):
        self.kind, self.rows, self.counts = kind, rows, counts
        self.row_ids = np.asarray(row_ids, np.int64)
        self.variants = np.asarray(variants, np.int64)
        self._build = build

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.read(range(*index.indices(len(self))))
        index = range(len(self))[index]  # bounds check and negative indices
        return self._build(self.rows[int(self.row_ids[index])], int(self.variants[index]))

    def read(self, indices: Sequence[int]) -> list[dict]:
        """Examples at `indices` (one batched read of their rows)."""
        indices = np.asarray(list(indices), np.int64)
        if len(indices) and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"example index out of range for {len(self)} examples")
        rows = self.rows.read(self.row_ids[indices])
        return [self._build(row, int(v)) for row, v in zip(rows, self.variants[indices])]

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self), 1024):
            yield from self.read(range(start, min(start + 1024, len(self))))

    def __repr__(self) -> str:
        return f"LazyExamples(kind={self.kind!r}, n={len(self)}, rows={self.rows.path}:{self.rows.split})"


def _lazy_require(rows: PreparedSplit, fields: tuple[str, ...], view: str) -> None:
    """The field check of the eager views, on the first row (every row of a prepared split has the
    same fields)."""
    if len(rows):
        _require(rows[0], fields, 0, view)


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two examples per row: (row ids 0,0,1,1,..., variants 0,1,0,1,...)."""
    return np.repeat(np.arange(n), 2), np.tile(np.arange(2), n)


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
    if isinstance(rows, PreparedSplit):
        _lazy_require(rows, ("prompt", "response_0", "response_1")
                      + (() if response == "both" else (f"{response}_response_id",)), "sft_examples")
        if response == "both":
            row_ids, variants = _pairs(len(rows))
        else:
            row_ids, variants = np.arange(len(rows)), rows.summary()[f"{response}_id"]
        out = LazyExamples("sft", rows, row_ids, variants,
                           lambda row, i: {"prompt": format_prompt(row["prompt"], template),
                                           "response": row[f"response_{i}"]}, Counter())
        out.counts["kept"] = len(out)
        return out
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
    if isinstance(rows, PreparedSplit):
        _lazy_require(rows, ("prompt", "response_0", "response_1", "better_response_id"), "preference_examples")
        summary = rows.summary()
        keep = np.flatnonzero(~summary["identical"])
        counts = Counter()
        if len(keep) < len(rows):
            counts["skipped_identical"] = len(rows) - len(keep)

        def build(row: dict, b: int) -> dict:
            return {"prompt": format_prompt(row["prompt"], template), "better": row[f"response_{b}"],
                    "worse": row[f"response_{1 - b}"]}

        out = LazyExamples("preference", rows, keep, summary["better_id"][keep], build, counts)
        out.counts["kept"] = len(out)
        return out
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
    is labelled safe (safer_sign < unsafer_sign; https://github.com/PKU-Alignment/safe-rlhf/issues/181):
    "error" raises (upstream),
    "skip" drops it, "keep" keeps it; skipped and kept ones are counted in `.counts`.
    """
    if inconsistent not in INCONSISTENT_POLICIES:
        raise ValueError(f"inconsistent must be one of {INCONSISTENT_POLICIES}, got {inconsistent!r}")
    needed = ("prompt", "response_0", "response_1", "safer_response_id", "is_response_0_safe", "is_response_1_safe")
    if isinstance(rows, PreparedSplit):
        return _lazy_safety_preference(rows, template, inconsistent, needed)
    out = Examples("safety_preference")
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
                raise _inconsistent_error(index, s, row)
            out.counts[f"inconsistent_{'skipped' if inconsistent == 'skip' else 'kept'}"] += 1
            if inconsistent == "skip":
                continue
        out.append(_safety_example(row, template))
    out.counts["kept"] = len(out)
    return out


def _inconsistent_error(index: int, s: int, row: dict) -> ValueError:
    return ValueError(
        f"row {index}: the safer response (response_{s}) is labelled unsafe while the other is "
        f"labelled safe (safe-rlhf #181); pass inconsistent='skip' or 'keep'. prompt={row['prompt']!r:.80}"
    )


def _safety_example(row: dict, template: Template) -> dict:
    s = row["safer_response_id"]
    return {
        "prompt": format_prompt(row["prompt"], template),
        "safer": row[f"response_{s}"],
        "unsafer": row[f"response_{1 - s}"],
        "safer_sign": 1 if row[f"is_response_{s}_safe"] else -1,
        "unsafer_sign": 1 if row[f"is_response_{1 - s}_safe"] else -1,
    }


def _lazy_safety_preference(rows: PreparedSplit, template: Template, inconsistent: str,
                            needed: tuple[str, ...]) -> LazyExamples:
    _lazy_require(rows, needed, "safety_preference_examples")
    summary = rows.summary()
    s = summary["safer_id"].astype(np.int64)
    safe = np.stack([summary["safe_0"], summary["safe_1"]], axis=1)
    index = np.arange(len(rows))
    safer_safe, unsafer_safe = safe[index, s], safe[index, 1 - s]
    identical = summary["identical"]
    bad = ~identical & ~safer_safe & unsafer_safe  # safer_sign < unsafer_sign
    counts = Counter()
    if identical.any():
        counts["skipped_identical"] = int(identical.sum())
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        if inconsistent == "error":
            raise _inconsistent_error(first, int(s[first]), rows[first])
        counts[f"inconsistent_{'skipped' if inconsistent == 'skip' else 'kept'}"] = int(bad.sum())
    keep = ~identical & ~bad if inconsistent == "skip" else ~identical
    row_ids = np.flatnonzero(keep)
    out = LazyExamples("safety_preference", rows, row_ids, np.zeros(len(row_ids)),
                       lambda row, _: _safety_example(row, template), counts)
    out.counts["kept"] = len(out)
    return out


def qa_examples(rows: Iterable[dict], *, template: Template = PROMPT_TEMPLATE) -> Examples:
    """QA rows, two per release row (like the 265k QA set): prompt, response, is_safe,
    categories (19 bools in HARM_CATEGORIES order), severity 0..3."""
    if isinstance(rows, PreparedSplit):
        if len(rows):
            for i in (0, 1):
                _require(rows[0], _qa_fields(i), 0, "qa_examples")
        row_ids, variants = _pairs(len(rows))
        out = LazyExamples("qa", rows, row_ids, variants, lambda row, i: _qa_example(row, i, template), Counter())
        out.counts["kept"] = len(out)
        return out
    out = Examples("qa")
    for index, row in enumerate(rows):
        for i in (0, 1):
            _require(row, _qa_fields(i), index, "qa_examples")
            out.append(_qa_example(row, i, template))
    out.counts["kept"] = len(out)
    return out


def _qa_fields(i: int) -> tuple[str, ...]:
    return (f"response_{i}", f"is_response_{i}_safe", f"response_{i}_harm_category", f"response_{i}_severity_level")


def _qa_example(row: dict, i: int, template: Template) -> dict:
    categories = row[f"response_{i}_harm_category"]
    return {
        "prompt": format_prompt(row["prompt"], template),
        "response": row[f"response_{i}"],
        "is_safe": bool(row[f"is_response_{i}_safe"]),
        "categories": [bool(categories[name]) for name in HARM_CATEGORIES],
        "severity": int(row[f"response_{i}_severity_level"]),
    }


def prompt_examples(rows: Iterable[dict], *, template: Template = PROMPT_TEMPLATE) -> Examples:
    """Prompt-only examples for RL, deduplicated by prompt text (upstream: last occurrence kept,
    then in index order)."""
    if isinstance(rows, PreparedSplit):
        _lazy_require(rows, ("prompt",), "prompt_examples")
        row_ids = np.flatnonzero(rows.summary()["prompt_last"])
        out = LazyExamples("prompt", rows, row_ids, np.zeros(len(row_ids)),
                           lambda row, _: {"prompt": format_prompt(row["prompt"], template)}, Counter())
        out.counts["kept"] = len(out)
        out.counts["duplicates_removed"] = len(rows) - len(out)
        return out
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
