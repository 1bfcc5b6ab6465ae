"""Jit-compiled autoregressive sampler over the KV cache of any model family.

    out = sample(params, cfg, prompt_ids, prompt_mask, rng, SamplingConfig(max_new_tokens=64))

Prompts are left-padded [B, S] (rows of different lengths in one batch). The params are put
in the decode layout once per call (layouts.decode_params: unrolled layers, fused q/k/v and
gate/up, optionally bf16 / int8 kernels), one prefill call fills the cache, then
`lax.while_loop`s decode one token per step for every row, with static shapes throughout: one
loop per segment of the steps, each over a cache grown to the slots that segment fills
(SamplingConfig.cache_segments); the loops exit early once every row has emitted an EOS id.
Each step draws one uniform per row (inverse CDF, see sample_with_log_probs), all drawn before
the loops.
`sample` is a pure function of arrays with static (hashable) configs, so it can be called
inside a larger jit (e.g. a jitted PPO rollout). The model comes from cfg's family
(`models.causal_lm(cfg)`, `models.init_cache`): every family samples the same way.

    for tokens, mask in stream(params, cfg, prompt_ids, prompt_mask, rng, sampling):   # [B, k] each
        ...                                  # the same draws as `sample`, as they are decoded

`stream` runs the same prefill and decode loop one run of steps per jitted call and hands each
run's tokens to the host (chat prints them as they come and stops when asked).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import models
from jaxalign.models import layouts, llama, quantize


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off. Filters apply in HF order:
    temperature, then top-k, then top-p. EOS may be several ids. weights: precision of the
    decode matmuls (models.quantize.MODES: "float32" exact, "bfloat16", "int8",
    "int8_weight_only"); the log-probs come from that model. cache_segments: the decode loop runs
    in this many segments, each attending over a cache only as long as it has filled (0 = auto:
    one per 32 steps or part of them, at most 4, on the unrolled single-device path; one loop
    when the layers stay scanned; each segment compiles the step once more)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    weights: str = "float32"
    cache_segments: int = 0

    def __post_init__(self):
        if isinstance(self.eos_token_ids, int):
            object.__setattr__(self, "eos_token_ids", (self.eos_token_ids,))
        else:
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        # nan fails every comparison, so each check is written to fail on it (and inf is refused).
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.weights not in quantize.MODES:
            raise ValueError(f"weights must be one of {list(quantize.MODES)}, got {self.weights!r}")
        if self.cache_segments < 0:
            raise ValueError(f"cache_segments must be >= 0 (0 = auto), got {self.cache_segments}")


@flax.struct.dataclass
class SampleOutput:
    """sequences [B, S+N] (prompt + response; after EOS = pad id); sequence_mask [B, S+N]
    (real prompt tokens and response tokens up to and including EOS); log_probs [B, N]
    (log-prob of each sampled token under the model's raw distribution, log_softmax(logits)
    at temperature 1 without top-k/top-p filtering, i.e. what a forward pass of the same
    model scores; 0 where response_mask is False); response_mask [B, N]."""

    sequences: jax.Array
    sequence_mask: jax.Array
    log_probs: jax.Array
    response_mask: jax.Array


def filter_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Temperature, top-k and top-p applied to logits [B, V] fp32; removed tokens get -inf.
    Only meaningful for temperature > 0."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = mass_before < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


# Inverse-CDF draws walk the vocab in blocks of this many entries (see _inverse_cdf).
_BLOCK = 128


def _first_above(cdf: jax.Array, weights: jax.Array, x: jax.Array) -> jax.Array:
    """[B] first index i with cdf[:, i] > x among entries of positive weight; the last
    positive-weight index when there is none (x rounded up to the total). cdf, weights [B, N]."""
    n = cdf.shape[-1]
    iota = jnp.arange(n, dtype=jnp.int32)
    first = jnp.min(jnp.where((cdf > x[:, None]) & (weights > 0), iota, n), axis=-1)
    last = jnp.max(jnp.where(weights > 0, iota, -1), axis=-1)
    return jnp.where(first == n, last, first)


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Index [B] drawn with probability weights / weights.sum(-1), from unnormalised weights
    [B, V] >= 0 (a positive entry per row) and one uniform u [B] in [0, 1) per row: the first
    index whose cumulative weight exceeds u * total. Never an index of weight 0. Two levels
    (block of _BLOCK entries, then the entry inside it): a prefix sum over the whole vocab is
    an associative scan that costs XLA:CPU more than the rest of the step's sampling."""
    b, v = weights.shape
    blocks = jnp.pad(weights, ((0, 0), (0, -v % _BLOCK))).reshape(b, -1, _BLOCK)
    block_sums = jnp.sum(blocks, axis=-1)
    block_cdf = jnp.cumsum(block_sums, axis=-1)
    x = u * block_cdf[:, -1]
    block = _first_above(block_cdf, block_sums, x)
    inner = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    x = x - jnp.take_along_axis(block_cdf - block_sums, block[:, None], axis=1)[:, 0]
    return block * _BLOCK + _first_above(jnp.cumsum(inner, axis=-1), inner, x)


def sample_with_log_probs(logits: jax.Array, u: jax.Array, sampling: SamplingConfig):
    """(next token ids [B] int32, their raw log-probs [B] fp32) from logits [B, V] and one
    uniform u [B] in [0, 1) per row: argmax when temperature == 0 (u unused), else the
    inverse-CDF draw of u from the filtered distribution (one uniform per row rather than a
    Gumbel per vocab entry). The log-prob is log_softmax(logits) of the token at temperature 1
    without filters (SampleOutput.log_probs)."""
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    raw = jnp.exp(logits - top)
    log_z = top[:, 0] + jnp.log(jnp.sum(raw, axis=-1))
    vocab = logits.shape[-1]
    if sampling.temperature == 0.0:  # argmax: the first index of the row's maximum
        token = jnp.min(jnp.where(logits == top, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    else:
        unfiltered = sampling.temperature == 1.0 and not 0 < sampling.top_k < vocab and sampling.top_p == 1.0
        if unfiltered:  # the sampling weights are the log-prob's exponentials
            weights = raw
        else:
            filtered = filter_logits(logits, sampling)
            weights = jnp.exp(filtered - jnp.max(filtered, axis=-1, keepdims=True))
        token = _inverse_cdf(weights, u)
    token_logit = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
    return token, token_logit - log_z


def sample_token(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next token ids [B] int32 from logits [B, V] (argmax when temperature == 0)."""
    return sample_with_log_probs(logits, jax.random.uniform(rng, logits.shape[:1]), sampling)[0]


# cache_segments = 0 (auto): one segment per this many decode steps, at most _AUTO_MAX_SEGMENTS.
_AUTO_SEGMENT_STEPS, _AUTO_MAX_SEGMENTS = 32, 4


def decode_segments(max_new_tokens: int, segments: int) -> list[int]:
    """The step after the last of each decode segment: steps 1..max_new_tokens-1 (step 0 samples
    from the prefill) split into at most `segments` near-equal runs (0: auto, see SamplingConfig);
    [] when there is no step. On the benchmark config (128 new tokens) 4 segments sample 1.06x
    faster than one loop over the whole cache; the draws are the same up to fp32 rounding (the
    softmax sums over fewer masked slots)."""
    steps = max_new_tokens - 1
    if segments == 0:
        segments = max(1, min(_AUTO_MAX_SEGMENTS, -(-steps // _AUTO_SEGMENT_STEPS)))
    count = min(segments, steps)
    return [1 + -(-steps * (j + 1) // count) for j in range(count)]


def _last_logits(params, cfg, ids, mask, cache):
    """One model call; returns (logits of the last column [B, V] fp32, cache)."""
    model = models.causal_lm(cfg)
    return model.apply({"params": params}, ids, mask, None, cache, method=type(model).last_token_logits)


@flax.struct.dataclass
class DecodeState:
    """The decode loop's carry: step (int32 [], tokens emitted so far = the next index), token [B]
    (the last one emitted), tokens [B, N], log_probs [B, N], response_mask [B, N] (as in
    SampleOutput, filled up to `step`), the KV cache and live [B] (rows that have not emitted an
    EOS id yet)."""

    step: jax.Array
    token: jax.Array
    tokens: jax.Array
    log_probs: jax.Array
    response_mask: jax.Array
    cache: object
    live: jax.Array


def _emit(state: DecodeState, logits: jax.Array, uniforms: jax.Array, sampling: SamplingConfig) -> DecodeState:
    """Samples token `state.step` from logits [B, V] for rows still live (pad for the others)."""
    i = state.step
    eos = jnp.asarray(sampling.eos_token_ids or (-1,), jnp.int32)
    token, token_lp = sample_with_log_probs(logits, uniforms[i], sampling)
    token = jnp.where(state.live, token, sampling.pad_token_id)
    return state.replace(
        step=i + 1,
        token=token,
        tokens=state.tokens.at[:, i].set(token),
        log_probs=state.log_probs.at[:, i].set(jnp.where(state.live, token_lp, 0.0)),
        response_mask=state.response_mask.at[:, i].set(state.live),
        live=state.live & ~jnp.isin(token, eos),
    )


def _start(params, cfg, prompt_ids, prompt_mask, uniforms, sampling: SamplingConfig, cache_length: int) -> DecodeState:
    """Prefill of the prompt [B, S] (left-padded) into a cache of cache_length slots, then token 0.
    params and cfg in the decode layout."""
    batch, n = prompt_ids.shape[0], sampling.max_new_tokens
    cache = models.init_cache(cfg, batch, cache_length)
    logits, cache = _last_logits(params, cfg, prompt_ids.astype(jnp.int32), prompt_mask.astype(bool), cache)
    state = DecodeState(step=jnp.int32(0), token=jnp.zeros((batch,), jnp.int32),
                        tokens=jnp.full((batch, n), sampling.pad_token_id, jnp.int32),
                        log_probs=jnp.zeros((batch, n), jnp.float32), response_mask=jnp.zeros((batch, n), bool),
                        cache=cache, live=jnp.ones((batch,), bool))
    return _emit(state, logits, uniforms, sampling)


def _decode(params, cfg, state: DecodeState, uniforms, sampling: SamplingConfig, end) -> DecodeState:
    """Decodes one token per step (every row) while step < end and a row is live; end may be traced."""

    def body(state: DecodeState) -> DecodeState:
        # The previous token is real for rows that were live when it was emitted.
        fed = state.response_mask[:, state.step - 1]
        logits, cache = _last_logits(params, cfg, state.token[:, None], fed[:, None], state.cache)
        return _emit(state.replace(cache=cache), logits, uniforms, sampling)

    return jax.lax.while_loop(lambda s: (s.step < end) & jnp.any(s.live), body, state)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"))
def sample(
    params,
    cfg: llama.LlamaConfig,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    sampling: SamplingConfig,
) -> SampleOutput:
    """Samples max_new_tokens per row. prompt_ids, prompt_mask: [B, S] left-padded.

    Returns SampleOutput (see its docstring); rows stop at their first EOS id.
    """
    batch, prompt_len = prompt_ids.shape
    n = sampling.max_new_tokens
    cfg, params = layouts.decode_params(cfg, params, sampling.weights)
    # auto keeps one loop where the layers stay scanned (sharded weights): there every growth copies
    # the whole stacked cache, and the 8B LoRA plan's rollout grew from 9.2 to 14.8 GiB per chip.
    segment_ends = decode_segments(n, sampling.cache_segments or (1 if cfg.scan_layers else 0))
    uniforms = jax.random.uniform(rng, (n, batch))  # one per row and step, drawn up front
    state = _start(params, cfg, prompt_ids, prompt_mask, uniforms, sampling,
                   prompt_len + (segment_ends[0] if segment_ends else n))
    for end in segment_ends:  # steps up to `end` attend over a cache of prompt_len + end slots
        state = state.replace(cache=models.grow_cache(cfg, state.cache, prompt_len + end))
        state = _decode(params, cfg, state, uniforms, sampling, end)
    prompt_mask = prompt_mask.astype(bool)
    prompt_ids = jnp.where(prompt_mask, prompt_ids, sampling.pad_token_id).astype(jnp.int32)
    return SampleOutput(
        sequences=jnp.concatenate([prompt_ids, state.tokens], axis=1),
        sequence_mask=jnp.concatenate([prompt_mask, state.response_mask], axis=1),
        log_probs=state.log_probs,
        response_mask=state.response_mask,
    )


# ---------------------------------------------------------------------------------- streaming


@flax.struct.dataclass
class DecodeModel:
    """A model in the decode layout (layouts.decode_params): its config (static) and params."""

    cfg: object = flax.struct.field(pytree_node=False)
    params: object = None


@functools.partial(jax.jit, static_argnames=("cfg", "weights"))
def decode_model(params, cfg, weights: str = "float32") -> DecodeModel:
    """The params in the decode layout, made once per stream (a copy of the weights, as in `sample`)."""
    return DecodeModel(*layouts.decode_params(cfg, params, weights))


@functools.partial(jax.jit, static_argnames=("sampling",))
def _stream_start(model: DecodeModel, prompt_ids, prompt_mask, rng, sampling: SamplingConfig):
    """(state after token 0, uniforms [N, B]): the draws and prefill of `sample`, in one cache of
    S + N slots."""
    uniforms = jax.random.uniform(rng, (sampling.max_new_tokens, prompt_ids.shape[0]))
    state = _start(model.params, model.cfg, prompt_ids, prompt_mask, uniforms, sampling,
                   prompt_ids.shape[1] + sampling.max_new_tokens)
    return state, uniforms


@functools.partial(jax.jit, static_argnames=("sampling",), donate_argnames=("state",))
def _stream_steps(model: DecodeModel, state: DecodeState, uniforms, sampling: SamplingConfig, end) -> DecodeState:
    return _decode(model.params, model.cfg, state, uniforms, sampling, end)


def stream(params, cfg, prompt_ids, prompt_mask, rng: jax.Array, sampling: SamplingConfig, *,
           chunk: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`sample`, handing the tokens to the host as they are decoded: yields (tokens [B, k],
    response_mask [B, k]) numpy arrays for each run of k <= chunk new tokens (the first run is
    token 0 alone), until every row has emitted an EOS id or max_new_tokens are out. A caller
    stops the decode by no longer asking for the next run.

    The same draws as `sample` with the same rng, over one cache of S + max_new_tokens slots (so
    the tokens equal `sample`'s with cache_segments=1); the params are put in the decode layout
    once per call; each run is one jitted call (compiled once per prompt width and chunk)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    model = decode_model(params, cfg, sampling.weights)
    state, uniforms = _stream_start(model, prompt_ids, prompt_mask, rng, sampling)
    shown = 0
    while True:
        step, tokens, mask, live = jax.device_get((state.step, state.tokens, state.response_mask, state.live))
        step = int(step)
        yield tokens[:, shown:step], mask[:, shown:step]
        shown = step
        if step >= sampling.max_new_tokens or not live.any():
            return
        state = _stream_steps(model, state, uniforms, sampling, jnp.int32(min(step + chunk, sampling.max_new_tokens)))
