"""The moderation API: `moderate(pairs, model) -> results`, batched on the mesh.

    moderator = load_moderator("out/moderation_tiny/export", batch_size=16)
    results = moderator([("question", "answer"), {"prompt": ..., "response": ...}])
    results = moderate(pairs, "out/moderation_tiny/export")        # the same, loading the model once

Each result is a dict:

    is_safe              bool   P(unsafe) < the model's threshold (chosen on validation data)
    unsafe_probability   float  P(unsafe) at the answer's last token
    categories           {name: probability} for the 19 harm categories
    flagged_categories   [name, ...] (empty when safe; at least the most probable one when unsafe)
    severity             int 0..3 (0 when safe)
    truncated            bool   the text did not fit max_length and was cut (see below)
    tokens_kept          {"prompt": n, "response": m}  tokens scored (the response's without its end token)
    response_cut         bool   the response alone exceeded max_length: only its first m tokens were scored

The decision rule is evaluate/moderation.py `decide`, the one `jaxalign evaluate moderation`
scores. Prompts are formatted with the template the model was trained with (config.json
prompt_template), texts are prompt + response + eos like training, at most max_length tokens
(the training length unless given). A text that does not fit is cut so that the verdict is
about the response: the prompt is cut from the left (its last tokens, next to the answer, stay).
Only when the response alone exceeds max_length is the response cut, on the right, after the
prompt's last max_length // 4 tokens: the verdict is then the streaming head's verdict on that
prefix of the answer, which the model is trained to give at every token (models/moderation.py),
and the row is marked `response_cut`. Before tokenising, a prompt is capped to its last and a
response to its first (max_length + 2) x (the tokenizer's longest token in characters)
characters, which can only touch texts that are cut anyway: memory and time stay bounded
whatever the length of a line.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from jaxalign.data import views
from jaxalign.evaluate import moderation as evaluate_lib
from jaxalign.models import loading
from jaxalign.models.tokenizer import load_tokenizer
from jaxalign.parallel import mesh as mesh_lib

log = logging.getLogger(__name__)

Pair = tuple[str, str] | Mapping[str, Any]


def _pair(item: Pair, index: int) -> tuple[str, str]:
    """(prompt, response) of a tuple or a {"prompt", "response"} mapping; ValueError naming the item."""
    if isinstance(item, Mapping):
        prompt, response = item.get("prompt"), item.get("response")
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        prompt, response = item
    else:
        raise ValueError(f"pair {index}: expected (prompt, response) or a dict with prompt/response, "
                         f"got {type(item).__name__}")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(f"pair {index}: prompt and response must be strings")
    return prompt, response


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One (prompt, response) as the token ids scored and what was cut to fit max_length."""

    ids: list[int]
    prompt_kept: int
    response_kept: int  # without the end token
    truncated: bool
    response_cut: bool


def longest_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` can cover (its longest vocabulary entry)."""
    return max(1, max(map(len, tokenizer.get_vocab()), default=1))


def encode_pair(tokenizer, prompt_text: str, response: str, max_length: int, max_chars: int) -> Encoded:
    """prompt_text (already in the template) + response + eos as at most max_length ids, cut as the
    module docstring says. max_chars caps both texts before tokenising (longest_token_chars)."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=True, truncation=False, padding=False)["input_ids"]

    capped_prompt = prompt_text[-max_chars:] if len(prompt_text) > max_chars else prompt_text
    capped = len(response) > max_chars
    full = encode(capped_prompt + (response[:max_chars] if capped else response + tokenizer.eos_token))
    prompt_length = len(encode(capped_prompt))
    lead = len(encode(""))  # special tokens the tokenizer puts in front (BOS)
    head, prompt, answer = full[:lead], full[lead:prompt_length], full[prompt_length:]
    answer_tokens = len(answer) - (0 if capped else 1)  # the end token is not the response's
    budget = max_length - lead
    if len(full) <= max_length:
        return Encoded(full, len(prompt), answer_tokens, False, False)
    if len(answer) <= budget:  # cut the prompt from the left: the whole response is scored
        keep = budget - len(answer)
        return Encoded(head + prompt[len(prompt) - keep:] + answer, keep, answer_tokens, True, False)
    keep = min(len(prompt), budget // 4)
    kept_answer = answer[:budget - keep]
    return Encoded(head + prompt[len(prompt) - keep:] + kept_answer, keep,
                   min(len(kept_answer), answer_tokens), True, True)


@dataclasses.dataclass
class Moderator:
    """A loaded moderation model; call it on pairs (see the module docstring)."""

    model: loading.Placed
    tokenizer: Any
    template: views.Template
    batch_size: int
    max_length: int
    scorer: Callable
    max_chars: int = 0  # per text, before tokenising (0: (max_length + 2) x the longest token)

    def __post_init__(self):
        if not self.max_chars:
            self.max_chars = (self.max_length + 2) * longest_token_chars(self.tokenizer)

    @property
    def head(self):
        return self.model.head

    def __call__(self, pairs: Iterable[Pair], progress: Callable[[int], None] | None = None) -> list[dict]:
        """Results for `pairs` in order; progress(n) is called after each batch of n pairs."""
        pairs = [_pair(item, i) for i, item in enumerate(pairs)]
        results: list[dict] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            results.extend(self.score_batch(chunk))
            if progress is not None:
                progress(len(chunk))
        return results

    def encode(self, pairs: Sequence[tuple[str, str]]) -> tuple[dict, list[Encoded]]:
        """({"input_ids", "attention_mask"} [N, max_length], right-padded; the Encoded of each pair)."""
        encoded = [encode_pair(self.tokenizer, views.format_prompt(p, self.template), r, self.max_length,
                               self.max_chars) for p, r in pairs]
        ids = np.full((len(encoded), self.max_length), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(encoded), self.max_length), bool)
        for i, item in enumerate(encoded):
            ids[i, :len(item.ids)] = item.ids
            mask[i, :len(item.ids)] = True
        return {"input_ids": ids, "attention_mask": mask}, encoded

    def score_batch(self, pairs: Sequence[tuple[str, str]]) -> list[dict]:
        """Results for at most batch_size (prompt, response) pairs."""
        arrays, encoded = self.encode(pairs)
        scores = self.scorer(self.model.params, arrays, batch_size=self.batch_size)
        head = self.head
        is_unsafe, flagged, severity = evaluate_lib.decide(scores["unsafe"], scores["categories"], scores["severity"],
                                                           head.threshold, head.category_cutoffs())
        names = head.category_names
        return [{
            "is_safe": not bool(is_unsafe[i]),
            "unsafe_probability": float(scores["unsafe"][i]),
            "categories": {name: float(p) for name, p in zip(names, scores["categories"][i])},
            "flagged_categories": [name for name, f in zip(names, flagged[i]) if f],
            "severity": int(severity[i]),
            "truncated": encoded[i].truncated,
            "tokens_kept": {"prompt": encoded[i].prompt_kept, "response": encoded[i].response_kept},
            "response_cut": encoded[i].response_cut,
        } for i in range(len(pairs))]


def load_moderator(model_dir: str | pathlib.Path, *, batch_size: int = 16, max_length: int | None = None,
                   dtype: str = "float32", param_dtype: str = "float32", tokenizer_dir: str = "",
                   mesh=None, rules=None) -> Moderator:
    """The moderation model of `model_dir` (a moderation stage export) and its tokenizer on `mesh`
    (default: every device, FSDP). batch_size is rounded up to a multiple of the batch shards."""
    if mesh is None:
        settings = mesh_lib.MeshSettings()
        mesh, rules = mesh_lib.make_mesh(settings), mesh_lib.axis_rules(settings)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    shards = int(mesh.shape["data"] * mesh.shape["fsdp"])
    batch_size = -(-batch_size // shards) * shards
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    model = loading.load_moderation_model(loading.ModelSettings(init_path=str(model_dir), dtype=dtype,
                                                                param_dtype=param_dtype), mesh, rules,
                                          min_vocab_size=len(tokenizer))
    head = model.head
    template = views.chat_template(tokenizer) if head.prompt_template == "chat" else head.prompt_template
    return Moderator(model=model, tokenizer=tokenizer, template=template, batch_size=batch_size,
                     max_length=int(max_length or head.max_length),
                     scorer=evaluate_lib.make_scorer(model.module, mesh, rules))


def moderate(pairs: Iterable[Pair], model: str | pathlib.Path | Moderator, **kwargs) -> list[dict]:
    """Results (module docstring) for (prompt, response) pairs; `model` is a Moderator or a model
    dir (loaded with load_moderator(model, **kwargs))."""
    moderator = model if isinstance(model, Moderator) else load_moderator(model, **kwargs)
    return moderator(pairs)

