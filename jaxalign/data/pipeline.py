"""Tokenize, pad and batch view examples into global jax.Arrays sharded on the mesh's batch axis.

Trainers call one function:

    batches = make_batches("preference", examples, tokenizer, batch_size=16, max_length=512,
                           mesh=mesh, seed=42)            # BatchIterator
    batch = next(batches)                                 # dict of jax.Array, keys below
    state = batches.get_state()                           # JSON-serialisable; save with the checkpoint
    batches = make_batches(...same args...); batches.set_state(state)   # resumes on the next batch

and, for evaluation, `arrays, truncated = tokenize_examples(kind, examples, tokenizer, max_length=L)`
(numpy, the same keys, in example order).

Keys and shapes (docs/architecture.md), B = batch_size, L = max_length:

    sft                input_ids [B,L] int32, attention_mask [B,L] bool, loss_mask [B,L] bool
    preference         better_/worse_input_ids, better_/worse_attention_mask [B,L],
                       better_/worse_response_mask [B,L] bool (the response tokens)
    safety_preference  safer_/unsafer_input_ids, safer_/unsafer_attention_mask, safer_/unsafer_response_mask,
                       safer_sign [B], unsafer_sign [B] int32 (+1 safe, -1 unsafe)
    prompt             input_ids [B,L] left-padded, attention_mask [B,L]
    qa                 input_ids, attention_mask, is_safe [B] bool, categories [B,19] bool, severity [B] int32
                       response_mask [B,L] bool (the response tokens, like sft's loss_mask)

Tokenization follows upstream (safe-rlhf safe_rlhf/datasets/base.py `TokenizedDataset.tokenize`,
safe_rlhf/datasets/supervised.py, preference.py): the tokenizer adds BOS (`add_special_tokens=True`);
training texts are `prompt + response + tokenizer.eos_token`; over-long sequences are cut on the
right (which drops the EOS). Every cut is counted per key
(`BatchIterator.truncated`, the second value of `tokenize_examples`) and logged, never silent;
so is every row whose prompt alone fills max_length, leaving it no response token
("no_response_tokens": it trains nothing). `rows_without_response` counts those rows of a split
before training (stages refuse a split where no row keeps a response token).
SFT `loss_mask` (and every `*response_mask`) is True on the response tokens: positions >=
len(tokenize(prompt)) that are real.
Padding is to exactly `max_length` (static shapes): right for sft/preference/safety/qa, left
for prompt.

Order: a grain MapDataset over example indices, shuffled from `seed` with a different
permutation each epoch, repeated `num_epochs` times (None = forever), cut into global batches
of `batch_size` indices (a batch may run across an epoch boundary; only the very last partial
batch is dropped or kept). Every process computes the same index batches and tokenizes only the
rows its devices hold (`jax.process_index()`), then `jax.make_array_from_process_local_data`
assembles the global array; so the global batches do not depend on the device or process count.
With lazy examples (views over a prepared ArrayRecord split, see sources.read_split) a process
reads from storage only the records of the rows it tokenizes.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Sequence

import numpy as np

KINDS = ("sft", "preference", "safety_preference", "prompt", "qa")
BATCH_AXES = ("data", "fsdp")
# kind -> names of the text sequences of one example
_SEQUENCES = {
    "sft": ("",),
    "preference": ("better", "worse"),
    "safety_preference": ("safer", "unsafer"),
    "prompt": ("",),
    "qa": ("",),
}

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Tokenization of one batch of examples -> numpy


def _texts(kind: str, examples: Sequence[dict], eos: str) -> dict[str, list[str]]:
    """The strings to tokenize per sequence name ('' for single-sequence kinds)."""
    if kind == "prompt":
        return {"": [e["prompt"] for e in examples]}
    if kind in ("sft", "qa"):
        return {"": [e["prompt"] + e["response"] + eos for e in examples]}
    a, b = _SEQUENCES[kind]
    return {a: [e["prompt"] + e[a] + eos for e in examples], b: [e["prompt"] + e[b] + eos for e in examples]}


def _pad(ids_list: list[list[int]], max_length: int, pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Cut each sequence to max_length on the right and pad -> (ids [N,L] int32, mask [N,L] bool, n_cut)."""
    n = len(ids_list)
    ids = np.full((n, max_length), pad_id, dtype=np.int32)
    mask = np.zeros((n, max_length), dtype=bool)
    cut = 0
    for i, seq in enumerate(ids_list):
        if len(seq) > max_length:
            cut += 1
            seq = seq[:max_length]
        k = len(seq)
        if left:
            ids[i, max_length - k:] = seq
            mask[i, max_length - k:] = True
        else:
            ids[i, :k] = seq
            mask[i, :k] = True
    return ids, mask, cut


class _Tokenizer:
    """Serialises calls into an HF tokenizer: grain may call from several threads."""

    def __init__(self, tokenizer):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; load it with jaxalign.models.tokenizer.load_tokenizer")
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos token; load it with jaxalign.models.tokenizer.load_tokenizer")
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos = tokenizer.eos_token
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> list[list[int]]:
        with self._lock:
            return self.tokenizer(texts, add_special_tokens=True, truncation=False, padding=False)["input_ids"]


def _check_kind(kind: str, examples) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown batch kind {kind!r}; expected one of {KINDS}")
    view_kind = getattr(examples, "kind", None)
    if view_kind is not None and view_kind != kind:
        raise ValueError(f"examples are of kind {view_kind!r} but batches of kind {kind!r} were asked for")


def _take(examples: Sequence[dict], indices: np.ndarray) -> list[dict]:
    """Examples at indices; one batched read when the examples are lazy (views.LazyExamples over a
    prepared ArrayRecord split), so a process reads only the records of its own rows."""
    read = getattr(examples, "read", None)
    if read is not None:
        return read(indices)
    return [examples[int(i)] for i in indices]


def _tokenize(kind: str, examples: Sequence[dict], tok: _Tokenizer, max_length: int) -> tuple[dict, Counter]:
    """Tokenize and pad examples -> (numpy arrays keyed as the batch contract, truncated counts per key)."""
    arrays: dict[str, np.ndarray] = {}
    truncated: Counter = Counter()
    for name, texts in _texts(kind, examples, tok.eos).items():
        prefix = f"{name}_" if name else ""
        ids, mask, cut = _pad(tok(texts), max_length, tok.pad_id, left=(kind == "prompt"))
        arrays[f"{prefix}input_ids"] = ids
        arrays[f"{prefix}attention_mask"] = mask
        truncated[f"{prefix}input_ids"] += cut
    if kind != "prompt":  # the response tokens: sft's loss, streaming moderation, response-window ℓ
        prompt_lengths = np.array([len(s) for s in tok([e["prompt"] for e in examples])])
        truncated["no_response_tokens"] += int(np.sum(prompt_lengths >= max_length))
        after_prompt = np.arange(max_length)[None, :] >= prompt_lengths[:, None]
        if kind in ("sft", "qa"):
            arrays["loss_mask" if kind == "sft" else "response_mask"] = after_prompt & arrays["attention_mask"]
        else:
            for name in _SEQUENCES[kind]:
                arrays[f"{name}_response_mask"] = after_prompt & arrays[f"{name}_attention_mask"]
    if kind == "safety_preference":
        arrays["safer_sign"] = np.array([e["safer_sign"] for e in examples], dtype=np.int32)
        arrays["unsafer_sign"] = np.array([e["unsafer_sign"] for e in examples], dtype=np.int32)
    elif kind == "qa":
        arrays["is_safe"] = np.array([e["is_safe"] for e in examples], dtype=bool)
        arrays["categories"] = np.array([e["categories"] for e in examples], dtype=bool).reshape(len(examples), -1)
        arrays["severity"] = np.array([e["severity"] for e in examples], dtype=np.int32)
    return arrays, truncated


def tokenize_examples(kind: str, examples: Sequence[dict], tokenizer, *, max_length: int) -> tuple[dict, dict]:
    """All examples in order -> (numpy arrays [N, max_length] etc. keyed as the batch contract,
    {key: number of sequences cut to max_length})."""
    _check_kind(kind, examples)
    arrays, truncated = _tokenize(kind, list(examples), _Tokenizer(tokenizer), max_length)
    truncated = {k: v for k, v in truncated.items() if v}
    if truncated:
        log.warning("tokenize_examples(%s): sequences cut to max_length=%d: %s", kind, max_length, truncated)
    return arrays, truncated


def rows_without_response(kind: str, examples: Sequence[dict], tokenizer, *, max_length: int,
                          limit: int = 10_000, lazy_limit: int = 1024) -> tuple[int, int]:
    """(rows whose prompt alone is max_length tokens or more, so no response token survives the cut,
    rows checked): the first `limit` examples of an in-memory split, or the first `lazy_limit` of a
    lazy one (views over a prepared split: one bounded read, the same on every process)."""
    _check_kind(kind, examples)
    if kind == "prompt" or len(examples) == 0:
        return 0, len(examples)
    tok = _Tokenizer(tokenizer)
    read = getattr(examples, "read", None)
    if read is not None:
        checked = read(range(min(len(examples), lazy_limit)))
    else:
        checked = [examples[i] for i in range(min(len(examples), limit))]
    lengths = [len(ids) for ids in tok([e["prompt"] for e in checked])]
    return sum(length >= max_length for length in lengths), len(checked)


# ---------------------------------------------------------------------------------------------
# Sharding


def batch_sharding(mesh, ndim: int):
    """NamedSharding of a [B, ...] input: B over the mesh's data-parallel axes, the rest replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"mesh axes {mesh.axis_names} have none of the batch axes {BATCH_AXES}")
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def local_rows(mesh, batch_size: int) -> tuple[int, int]:
    """[start, stop) of the global batch rows held by this process's devices (contiguous)."""
    sharding = batch_sharding(mesh, 1)
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows = index[0]
        starts.append(rows.start or 0)
        stops.append(batch_size if rows.stop is None else rows.stop)
    start, stop = min(starts), max(stops)
    covered = sum(b - a for a, b in set(zip(starts, stops)))
    if covered != stop - start:
        raise ValueError("this process's batch rows are not contiguous in the mesh; reorder the mesh devices")
    return start, stop


def _shard_count(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


# ---------------------------------------------------------------------------------------------
# The iterator


class BatchIterator:
    """Iterator of global batches (dicts of jax.Array, or numpy when mesh is None).

    get_state() -> {"next_batch": int, "truncated": {...}}; set_state(state) resumes exactly there.
    `truncated` counts sequences cut to max_length in the batches returned so far.
    """

    def __init__(
        self,
        kind: str,
        examples: Sequence[dict],
        tokenizer,
        *,
        batch_size: int,
        max_length: int,
        mesh=None,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        num_threads: int = 2,
        prefetch: int = 8,
    ):
        import grain

        _check_kind(kind, examples)
        if len(examples) == 0:
            raise ValueError(f"no {kind} examples to batch")
        self.kind, self.examples, self.batch_size, self.max_length = kind, examples, batch_size, max_length
        self.mesh = mesh
        self._tok = _Tokenizer(tokenizer)
        if mesh is not None:
            shards = _shard_count(mesh)
            if batch_size % shards:
                raise ValueError(f"batch_size {batch_size} is not divisible by the {shards} batch shards of the mesh")
            self._rows = local_rows(mesh, batch_size)
        else:
            self._rows = (0, batch_size)
        self.truncated: Counter = Counter()

        indices = grain.MapDataset.range(len(examples))
        if shuffle:
            indices = indices.shuffle(seed=seed)  # a new permutation each epoch (per-epoch seed)
        indices = indices.repeat(num_epochs)
        self._dataset = indices.batch(batch_size, drop_remainder=drop_remainder).map(self._local_batch)
        self._read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._iterator = iter(self._dataset.to_iter_dataset(self._read_options))
        self._next_batch = 0

    def __len__(self) -> int:
        """Batches in total (a very large number when num_epochs is None)."""
        return len(self._dataset)

    def _local_batch(self, indices: np.ndarray) -> tuple[dict, Counter, int]:
        """Global index batch -> (this process's rows tokenized, truncation counts, global size)."""
        start, stop = self._rows
        n = len(indices)
        if n != self.batch_size:  # last partial batch (drop_remainder=False): same share per shard
            if self.mesh is not None and n % _shard_count(self.mesh):
                raise ValueError(f"last batch of {n} rows cannot be split over the mesh's batch shards; "
                                 "use drop_remainder=True or a divisible number of examples")
            start, stop = start * n // self.batch_size, stop * n // self.batch_size
        local = _take(self.examples, indices[start:stop])
        arrays, truncated = _tokenize(self.kind, local, self._tok, self.max_length)
        return arrays, truncated, n

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        arrays, truncated, n = next(self._iterator)
        self._next_batch += 1
        new = {k: v for k, v in truncated.items() if v}
        if new:
            if not self.truncated:
                log.warning("%s batches: sequences cut to max_length=%d (counted in .truncated): %s",
                            self.kind, self.max_length, new)
            self.truncated.update(new)
        if self.mesh is None:
            return arrays
        import jax

        return {
            key: jax.make_array_from_process_local_data(batch_sharding(self.mesh, value.ndim), value,
                                                        (n, *value.shape[1:]))
            for key, value in arrays.items()
        }

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the index of the next batch and truncation counts so far."""
        return {"next_batch": self._next_batch, "truncated": dict(self.truncated)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a state of get_state(): the next batch is the one that followed it."""
        self._iterator.set_state({"next_index": int(state["next_batch"])})
        self._next_batch = int(state["next_batch"])
        self.truncated = Counter(state.get("truncated", {}))


def make_batches(
    kind: str,
    examples: Sequence[dict],
    tokenizer,
    *,
    batch_size: int,
    max_length: int,
    mesh=None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
) -> BatchIterator:
    """Global batches of `kind` from view examples (views.py), see the module docstring.

    batch_size is the global batch size; mesh None gives numpy batches on the host.
    """
    return BatchIterator(kind, examples, tokenizer, batch_size=batch_size, max_length=max_length, mesh=mesh,
                         seed=seed, shuffle=shuffle, num_epochs=num_epochs, drop_remainder=drop_remainder)
