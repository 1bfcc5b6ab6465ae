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

The decision rule is evaluate/moderation.py `decide`, the one `jaxalign evaluate moderation`
scores. Prompts are formatted with the template the model was trained with (config.json
prompt_template), texts are prompt + response + eos like training, cut on the right to
max_length (the training length unless given; cuts are logged).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence

from jaxalign.data import pipeline, views
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


@dataclasses.dataclass
class Moderator:
    """A loaded moderation model; call it on pairs (see the module docstring)."""

    model: loading.Placed
    tokenizer: Any
    template: views.Template
    batch_size: int
    max_length: int
    scorer: Callable

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

    def score_batch(self, pairs: Sequence[tuple[str, str]]) -> list[dict]:
        """Results for at most batch_size (prompt, response) pairs."""
        examples = views.Examples("sft", [{"prompt": views.format_prompt(p, self.template), "response": r}
                                          for p, r in pairs])
        arrays, _ = pipeline.tokenize_examples("sft", examples, self.tokenizer, max_length=self.max_length)
        arrays = {"input_ids": arrays["input_ids"], "attention_mask": arrays["attention_mask"]}
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

