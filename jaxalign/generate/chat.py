"""Multi-turn chat with one or more policies side by side (upstream `safe_rlhf.serve.cli`).

    chat = Chat([policy_a, policy_b], tokenizer, sampling)      # loading.Placed policies
    for name, pieces in chat.respond("How do I pick a lock?"):  # each model answers the same turn
        for piece in pieces: print(piece, end="")                # text as it is decoded

Each model keeps its own dialogue in the Safe RLHF template (spec §2.4):

    BEGINNING OF CONVERSATION: USER: u1 ASSISTANT:a1</s>USER: u2 ASSISTANT:

or the tokenizer's chat template when asked for. Tokens are decoded one by one on the host over the
family's KV cache (prefill, then one jitted decode step per token), so a caller sees each piece of
text as soon as it exists and can stop a generation early (e.g. at the first token a moderation
model flags). Prompts are left-padded to a multiple of `PROMPT_BUCKET` tokens so a conversation
compiles the prefill only a few times.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import models
from jaxalign.generate import sampler

PROMPT_BEGIN = "BEGINNING OF CONVERSATION: "
PROMPT_USER = "USER: {input} "
PROMPT_ASSISTANT = "ASSISTANT:"
PROMPT_BUCKET = 64


def upstream_dialogue(history: Sequence[tuple[str, str]], user: str, eos_token: str) -> str:
    """The Safe RLHF multi-turn prompt: past turns end with the EOS string, the last is open."""
    text = PROMPT_BEGIN
    for question, answer in history:
        text += PROMPT_USER.format(input=question) + PROMPT_ASSISTANT + answer + eos_token
    return text + PROMPT_USER.format(input=user) + PROMPT_ASSISTANT


def chat_template_dialogue(tokenizer) -> Callable[[Sequence[tuple[str, str]], str, str], str]:
    """A dialogue formatter that uses the tokenizer's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--template chat: the tokenizer has no chat_template; use --template upstream")

    def apply(history, user, eos_token):
        del eos_token
        messages = []
        for question, answer in history:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return apply


@functools.partial(jax.jit, static_argnames=("cfg", "max_length"))
def _prefill(params, cfg, ids: jax.Array, mask: jax.Array, max_length: int):
    """Prompt [1, S] (left-padded) -> (logits of its last token [1, V], cache with room for max_length)."""
    cache = models.init_cache(cfg, ids.shape[0], max_length)
    return sampler._last_logits(params, cfg, ids, mask, cache)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode(params, cfg, token: jax.Array, cache):
    """One token [1] -> (next logits [1, V], cache)."""
    return sampler._last_logits(params, cfg, token[:, None], jnp.ones((token.shape[0], 1), bool), cache)


@functools.partial(jax.jit, static_argnames=("sampling",))
def _pick(logits: jax.Array, rng: jax.Array, sampling: sampler.SamplingConfig):
    """The next token [1] and the split rng."""
    rng, key = jax.random.split(rng)
    return sampler.sample_token(logits, key, sampling), rng


def stream_tokens(params, cfg, prompt_ids: Sequence[int], sampling: sampler.SamplingConfig,
                  rng: jax.Array) -> Iterator[int]:
    """Yields the response's token ids one by one (EOS not included), at most max_new_tokens."""
    length = len(prompt_ids)
    padded = -(-length // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = np.full((1, padded), sampling.pad_token_id, np.int32)
    ids[0, padded - length:] = prompt_ids
    mask = np.arange(padded)[None, :] >= padded - length
    logits, cache = _prefill(params, cfg, jnp.asarray(ids), jnp.asarray(mask), padded + sampling.max_new_tokens)
    eos = set(sampling.eos_token_ids)
    for _ in range(sampling.max_new_tokens):
        token, rng = _pick(logits, rng, sampling)
        token_id = int(token[0])
        if token_id in eos:
            return
        yield token_id
        logits, cache = _decode(params, cfg, token, cache)


def stream_text(tokenizer, token_ids: Iterator[int]) -> Iterator[str]:
    """Decoded text pieces as tokens arrive (the whole response is re-decoded, so multi-token
    characters and BPE merges come out right)."""
    ids, shown = [], ""
    for token_id in token_ids:
        ids.append(token_id)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text


@dataclasses.dataclass
class Speaker:
    """One model in the chat: its name, placed policy, own dialogue history and the moderation
    verdict of each of its answers (when the chat has a moderator)."""

    name: str
    policy: object  # jaxalign.models.loading.Placed
    history: list = dataclasses.field(default_factory=list)
    verdicts: list = dataclasses.field(default_factory=list)


class Chat:
    """Side-by-side multi-turn chat; every speaker answers each user turn."""

    def __init__(self, speakers: Sequence[Speaker], tokenizer, sampling: sampler.SamplingConfig, seed: int = 0,
                 dialogue: Callable | None = None, moderator: Callable | None = None, stop_unsafe: bool = False):
        """moderator: a jaxalign.moderation.api.Moderator (pairs -> verdicts); every answer gets a
        verdict, and with stop_unsafe the answer is moderated as it streams (the streaming heads read
        each prefix) and cut at the first token that makes it unsafe."""
        self.speakers, self.tokenizer, self.sampling = list(speakers), tokenizer, sampling
        self.dialogue = dialogue or upstream_dialogue
        self.moderator, self.stop_unsafe = moderator, stop_unsafe
        if stop_unsafe and moderator is None:
            raise ValueError("stop_unsafe needs a moderation model (--moderation DIR)")
        self.rng = jax.random.PRNGKey(seed)
        self.last_user: str | None = None

    def reset(self) -> None:
        for speaker in self.speakers:
            speaker.history.clear()
            speaker.verdicts.clear()
        self.last_user = None

    def _answer(self, speaker: Speaker, user: str) -> Iterator[str]:
        text = self.dialogue(speaker.history, user, self.tokenizer.eos_token or "")
        prompt_ids = self.tokenizer(text)["input_ids"]
        self.rng, rng = jax.random.split(self.rng)
        pieces, verdict = [], None
        tokens = stream_tokens(speaker.policy.params, speaker.policy.cfg, prompt_ids, self.sampling, rng)
        for piece in stream_text(self.tokenizer, tokens):
            if self.stop_unsafe:
                verdict = self.moderator([(user, "".join(pieces) + piece)])[0]
                if not verdict["is_safe"]:
                    verdict = dict(verdict, stopped=True)
                    break
            pieces.append(piece)
            yield piece
        answer = "".join(pieces)
        if self.moderator is not None and not (verdict or {}).get("stopped"):
            verdict = self.moderator([(user, answer)])[0]
        speaker.history.append((user, answer))
        if self.moderator is not None:
            speaker.verdicts.append(verdict)

    def respond(self, user: str) -> Iterator[tuple[str, Iterator[str]]]:
        """(speaker name, text pieces) per speaker; consume each piece iterator in turn."""
        self.last_user = user
        for speaker in self.speakers:
            yield speaker.name, self._answer(speaker, user)

    def regenerate(self) -> Iterator[tuple[str, Iterator[str]]]:
        """Drops every speaker's last answer and answers the last user turn again."""
        if self.last_user is None:
            raise ValueError("nothing to regenerate yet")
        for speaker in self.speakers:
            if speaker.history:
                speaker.history.pop()
            if speaker.verdicts:
                speaker.verdicts.pop()
        return self.respond(self.last_user)


def describe_verdict(verdict: dict) -> str:
    """One line for a moderation verdict: safe / unsafe with P(unsafe), severity and categories."""
    text = "safe" if verdict["is_safe"] else f"UNSAFE (severity {verdict['severity']})"
    text += f", P(unsafe) {verdict['unsafe_probability']:.2f}"
    if verdict["flagged_categories"]:
        text += ", " + ", ".join(verdict["flagged_categories"])
    if verdict.get("stopped"):
        text += "; stopped at the first unsafe token"
    return text
