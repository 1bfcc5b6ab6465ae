"""The one way to load a policy and generate text with it (`sample`, `chat`, `evaluate judge`, `arena`).

    policy = load("out/sft_tiny/export")                 # any family; its own tokenizer; every device, FSDP
    texts = policy.generate(prompts, SamplingConfig(max_new_tokens=64), template=views.PROMPT_TEMPLATE)
    for piece in policy.stream_text(policy.encode(text), SamplingConfig(max_new_tokens=64), rng):
        print(piece, end="")                             # text as it is decoded (chat)

`load` resolves, once and here only:

- the tokenizer (the export's own files, or another dir): its vocabulary may exceed the model's
  embedding only by the special tokens `load_tokenizer` adds (`<pad>` for a Llama-1 tokenizer),
  whose rows are added as the mean of the others, as upstream's `resize_tokenizer_embedding`. A
  larger one is refused: the extra ids would index rows the model never trained, so it would
  write garbage. (Training may still resize: see `loading.load_policy`.)
- the EOS set: the model config's eos ids (e.g. Llama 3's two) and the tokenizer's EOS;
- the pad id: the tokenizer's, else the config's, else the first EOS id.

Every sampling call of a Policy gets that EOS set and pad id (`Policy.sampling`), and refuses a
prompt whose tokens plus the new tokens exceed the model's max_position_embeddings, naming both
numbers (`Policy.check_length`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
import tqdm

from jaxalign.data import pipeline, views
from jaxalign.generate import sampler
from jaxalign.models import hf, loading
from jaxalign.models.tokenizer import load_tokenizer
from jaxalign.parallel import mesh as mesh_lib

# Prompts are left-padded to a multiple of this many tokens before streaming, so a conversation
# compiles the prefill and the decode step only a few times.
PROMPT_BUCKET = 64


class TooLong(ValueError):
    """Prompt + new tokens exceed the model's max_position_embeddings (the message names both)."""


@dataclasses.dataclass
class Policy:
    """A causal LM on the mesh with its tokenizer and the special ids resolved once.

    cfg, params: the family's config and params (loading.Placed); eos_token_ids, pad_token_id: what
    every sampling call uses; the tokenizer pads on the left (prompts)."""

    path: str
    cfg: Any
    params: Any
    tokenizer: Any
    mesh: jax.sharding.Mesh
    rules: tuple
    eos_token_ids: tuple[int, ...]
    pad_token_id: int

    @property
    def max_length(self) -> int:
        """Positions the model was built for: prompt + response tokens must fit in them."""
        return int(self.cfg.max_position_embeddings)

    def sampling(self, sampling: sampler.SamplingConfig) -> sampler.SamplingConfig:
        """`sampling` with this policy's EOS ids and pad id."""
        return dataclasses.replace(sampling, eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id)

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """TooLong (one line naming both numbers) when prompt_tokens + max_new_tokens exceed the
        model's max_position_embeddings."""
        total = prompt_tokens + max_new_tokens
        if total > self.max_length:
            raise TooLong(f"the prompt's {prompt_tokens} tokens + {max_new_tokens} new tokens = {total} exceed "
                          f"max_position_embeddings {self.max_length} of {self.path}; shorten the prompt or "
                          f"lower --max-new-tokens")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the model reads it (BOS first where the tokenizer adds one)."""
        return self.tokenizer(text)["input_ids"]

    def generate(self, prompts: Sequence[str], sampling: sampler.SamplingConfig, *, seed: int = 0,
                 samples_per_prompt: int = 1, batch_size: int = 0, prompt_length: int = 0,
                 template: views.Template | None = None, desc: str = "") -> list[str]:
        """samples_per_prompt answers per prompt, prompt-major, as texts (special tokens dropped).

        prompts: texts, formatted with `template` when one is given; prompt_length: each prompt
        left-padded (and cut) to this many tokens (0: the longest prompt's length); batch_size:
        sequences per jitted sampler call, a multiple of the mesh's batch shards (0: all in one
        call); the last batch is completed with copies, so the sampler compiles once. Batch j
        draws from fold_in(PRNGKey(seed), its first row). desc: a progress bar's label."""
        shards = int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])
        total = len(prompts) * samples_per_prompt
        if batch_size == 0:
            batch_size = -(-total // shards) * shards
        if batch_size < 1 or batch_size % shards:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of the {shards} batch shards "
                             "of the mesh")
        texts = [views.format_prompt(p, template) for p in prompts] if template is not None else list(prompts)
        if not prompt_length:
            prompt_length = max(len(self.encode(text)) for text in texts)
        examples = views.Examples("prompt", [{"prompt": text} for text in texts])
        arrays, _ = pipeline.tokenize_examples("prompt", examples, self.tokenizer, max_length=prompt_length)
        self.check_length(int(arrays["attention_mask"].sum(-1).max()), sampling.max_new_tokens)
        sampling = self.sampling(sampling)
        order = np.repeat(np.arange(len(prompts)), samples_per_prompt)
        in_sharding = mesh_lib.batch_sharding(self.mesh, 2)
        rng = jax.random.PRNGKey(seed)
        answers: list[str] = []
        with mesh_lib.sharding_context(self.mesh, self.rules):
            for start in tqdm.trange(0, total, batch_size, desc=desc or "generate", leave=False,
                                     disable=not desc or jax.process_index() != 0):
                rows = order[np.minimum(np.arange(start, start + batch_size), total - 1)]
                ids = mesh_lib.put_sharded(arrays["input_ids"][rows], in_sharding)
                mask = mesh_lib.put_sharded(arrays["attention_mask"][rows], in_sharding)
                out = sampler.sample(self.params, self.cfg, ids, mask, jax.random.fold_in(rng, start), sampling)
                out = mesh_lib.global_rows(out.sequences), mesh_lib.global_rows(out.response_mask)
                texts_of_batch = decode_responses(self.tokenizer, *out, prompt_length, self.eos_token_ids)
                answers.extend(texts_of_batch[: total - start])
        return answers

    def stream(self, prompt_ids: Sequence[int], sampling: sampler.SamplingConfig, rng: jax.Array,
               stop: Callable[[], bool] | None = None) -> Iterator[int]:
        """The response's token ids (EOS not included) one by one as the sampler decodes them
        (sampler.stream); ends at EOS, max_new_tokens, or as soon as `stop()` is true (asked before
        each decoded token). TooLong before anything is decoded when the prompt does not fit."""
        self.check_length(len(prompt_ids), sampling.max_new_tokens)
        sampling = self.sampling(sampling)
        width = -(-len(prompt_ids) // PROMPT_BUCKET) * PROMPT_BUCKET
        ids = np.full((1, width), self.pad_token_id, np.int32)
        ids[0, width - len(prompt_ids):] = prompt_ids
        mask = np.arange(width)[None, :] >= width - len(prompt_ids)
        eos = set(self.eos_token_ids)
        with mesh_lib.sharding_context(self.mesh, self.rules):
            for tokens, emitted in sampler.stream(self.params, self.cfg, ids, mask, rng, sampling):
                for token in tokens[0][emitted[0]].tolist():
                    if token in eos:
                        return
                    yield token
                if stop is not None and stop():
                    return

    def stream_text(self, prompt_ids: Sequence[int], sampling: sampler.SamplingConfig, rng: jax.Array,
                    stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """`stream` as decoded text pieces: the response so far is re-decoded at every token, so
        characters of several tokens and BPE merges come out right; a piece is yielded once the
        text has grown and does not end in a partial character."""
        ids, shown = [], ""
        for token in self.stream(prompt_ids, sampling, rng, stop):
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text


def decode_responses(tokenizer, sequences: np.ndarray, response_mask: np.ndarray, prompt_length: int,
                     eos_token_ids: Sequence[int] = ()) -> list[str]:
    """Response texts of sampler output: sequences [B, S+N], response_mask [B, N] -> B strings,
    without special tokens and without the ids of eos_token_ids (an EOS that is an ordinary token)."""
    responses = np.asarray(sequences)[:, prompt_length:]
    keep = np.asarray(response_mask) & ~np.isin(responses, np.asarray(eos_token_ids, np.int64))
    return [tokenizer.decode(row[kept].tolist(), skip_special_tokens=True) for row, kept in zip(responses, keep)]


def special_ids(cfg, tokenizer) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) of a model config and its tokenizer: the config's eos ids and the
    tokenizer's EOS; the tokenizer's pad, else the config's, else the first EOS id."""
    eos = set(cfg.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    if not eos:
        raise ValueError("neither the model's config.json nor the tokenizer names an EOS token; set eos_token_id "
                         "in config.json")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.pad_token_id
    return tuple(sorted(eos)), int(min(eos) if pad is None else pad)


def check_vocabulary(tokenizer, model_vocab_size: int, model: str, tokenizer_dir: str) -> int:
    """The vocabulary size to load the model with: the larger of the model's and the tokenizer's.
    ValueError naming both sizes when the tokenizer has more tokens than the embedding beyond the
    special tokens load_tokenizer added (those alone are resized into the embedding)."""
    added = list(getattr(tokenizer, "jaxalign_added_tokens", []))
    own = len(tokenizer) - len(added)
    if own > model_vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir} has {own} tokens but the model {model} embeds {model_vocab_size}; "
                         "its extra ids would read untrained rows: use the tokenizer the model was trained with")
    return max(len(tokenizer), model_vocab_size)


def load(path: str | pathlib.Path, *, tokenizer: str | pathlib.Path | None = None, dtype: str = "float32",
         mesh: jax.sharding.Mesh | None = None, rules=None) -> Policy:
    """The policy of an HF causal-LM dir (config.json + safetensors; any family) on `mesh` (default:
    every device, FSDP), with the tokenizer of `tokenizer` (default: the dir's own files) padding on
    the left. FileNotFoundError / ValueError (one line) for a missing dir or config.json, a
    tokenizer larger than the embedding."""
    path = str(path)
    if not pathlib.Path(path).is_dir():
        raise FileNotFoundError(f"--model {path} is not a directory")
    if not (pathlib.Path(path) / hf.CONFIG_NAME).is_file():
        raise FileNotFoundError(f"--model {path}: no config.json (expected a policy dir, e.g. WORKDIR/export)")
    stored = hf.load_config(path)  # first: a malformed config.json is one line naming it
    tokenizer_dir = str(tokenizer or path)
    tok = load_tokenizer(tokenizer_dir, padding_side="left")
    vocab_size = check_vocabulary(tok, stored.vocab_size, path, tokenizer_dir)
    eos, pad = special_ids(stored, tok)
    if mesh is None:
        mesh, rules = mesh_lib.mesh_and_rules(mesh_lib.MeshSettings())
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=pad)
    placed = loading.load_policy(loading.ModelSettings(init_path=path, dtype=dtype), mesh, rules,
                                 vocab_size=vocab_size, special=special, rng=jax.random.PRNGKey(0))
    return Policy(path=path, cfg=placed.cfg, params=placed.params, tokenizer=tok, mesh=mesh, rules=rules,
                  eos_token_ids=eos, pad_token_id=pad)
