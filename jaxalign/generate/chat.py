"""Multi-turn chat with one or more policies side by side (upstream `safe_rlhf.serve.cli`).

    chat = Chat([Speaker("a", policy_a), Speaker("b", policy_b)], sampling)   # generate.policy.Policy each
    for answer in chat.respond("How do I pick a lock?"):   # each model answers the same turn
        for piece in answer.pieces: print(piece, end="")    # text as it is decoded

Each model keeps its own dialogue in the Safe RLHF template (upstream
`safe_rlhf/configs/constants.py` PROMPT_BEGIN / PROMPT_USER / PROMPT_ASSISTANT):

    BEGINNING OF CONVERSATION: USER: u1 ASSISTANT:a1</s>USER: u2 ASSISTANT:

or its tokenizer's chat template when asked for. Answers stream through the policy
(`Policy.stream_text`, i.e. the sampler's decode loop one token per call), so a caller sees each
piece of text as soon as it exists and can stop an answer early: at the first token a moderation
model flags, or when `stop()` turns true (Ctrl-C in `jaxalign chat`). A conversation that no longer
fits the model's max_position_embeddings (prompt + max_new_tokens) loses its oldest turns, and
the answer says how many; a message that does not fit even alone is refused (`policy.TooLong`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import jax

from jaxalign.generate import policy as policy_lib
from jaxalign.generate import sampler

PROMPT_BEGIN = "BEGINNING OF CONVERSATION: "
PROMPT_USER = "USER: {input} "
PROMPT_ASSISTANT = "ASSISTANT:"
TEMPLATES = ("upstream", "chat")


def upstream_dialogue(history: Sequence[tuple[str, str]], user: str, eos_token: str) -> str:
    """The Safe RLHF multi-turn prompt: past turns end with the EOS string, the last is open."""
    text = PROMPT_BEGIN
    for question, answer in history:
        text += PROMPT_USER.format(input=question) + PROMPT_ASSISTANT + answer + eos_token
    return text + PROMPT_USER.format(input=user) + PROMPT_ASSISTANT


def chat_template_dialogue(history: Sequence[tuple[str, str]], user: str, tokenizer) -> str:
    """The same dialogue in the tokenizer's own chat template, open for the assistant's answer."""
    messages = []
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclasses.dataclass
class Speaker:
    """One model in the chat: its name, policy (generate.policy.Policy), own dialogue history and
    the moderation verdict of each of its answers (when the chat has a moderator)."""

    name: str
    policy: policy_lib.Policy
    history: list = dataclasses.field(default_factory=list)
    verdicts: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Answer:
    """One speaker's answer to a turn: dropped (its oldest turns left out so that the prompt fits),
    pieces (the text as it is decoded; consume each answer's pieces in turn), and once they are
    consumed, stopped (the chat's stop() cut it short, or a stop before it began)."""

    speaker: Speaker
    dropped: int
    pieces: Iterator[str] = iter(())
    stopped: bool = False

    @property
    def name(self) -> str:
        return self.speaker.name


class Chat:
    """Side-by-side multi-turn chat; every speaker answers each user turn."""

    def __init__(self, speakers: Sequence[Speaker], sampling: sampler.SamplingConfig, seed: int = 0,
                 template: str = "upstream", moderator: Callable | None = None, stop_unsafe: bool = False,
                 stop: Callable[[], bool] | None = None):
        """template: "upstream" (Safe RLHF) or "chat" (each tokenizer's chat template).
        moderator: a jaxalign.moderation.api.Moderator (pairs -> verdicts); every answer gets a
        verdict, and with stop_unsafe the answer is moderated as it streams (the streaming heads read
        each prefix) and cut at the first token that makes it unsafe. stop: asked after every
        decoded token; true ends the answer (and the turn's later speakers do not start).
        policy.TooLong when max_new_tokens leaves no room for even an empty message."""
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        self.speakers, self.sampling, self.template = list(speakers), sampling, template
        self.moderator, self.stop_unsafe, self.stop = moderator, stop_unsafe, stop or (lambda: False)
        if stop_unsafe and moderator is None:
            raise ValueError("stop_unsafe needs a moderation model (--moderation DIR)")
        for speaker in self.speakers:
            if template == "chat" and not getattr(speaker.policy.tokenizer, "chat_template", None):
                raise ValueError(f"--template chat: the tokenizer of {speaker.name} has no chat_template; use "
                                 "--template upstream")
            speaker.policy.check_length(len(self._prompt_ids(speaker, [], "")), sampling.max_new_tokens)
        self.rng = jax.random.PRNGKey(seed)
        self.last_user: str | None = None

    def reset(self) -> None:
        for speaker in self.speakers:
            speaker.history.clear()
            speaker.verdicts.clear()
        self.last_user = None

    def _prompt_ids(self, speaker: Speaker, history, user: str) -> list[int]:
        tokenizer = speaker.policy.tokenizer
        if self.template == "chat":
            text = chat_template_dialogue(history, user, tokenizer)
        else:
            text = upstream_dialogue(history, user, tokenizer.eos_token or "")
        return speaker.policy.encode(text)

    def _fitting_prompt(self, speaker: Speaker, user: str) -> tuple[list[int], int]:
        """(prompt ids, number of oldest turns left out) of the shortest-cut dialogue that fits;
        policy.TooLong when `user` alone does not fit."""
        for dropped in range(len(speaker.history) + 1):
            ids = self._prompt_ids(speaker, speaker.history[dropped:], user)
            if len(ids) + self.sampling.max_new_tokens <= speaker.policy.max_length:
                break
        speaker.policy.check_length(len(ids), self.sampling.max_new_tokens)  # `user` alone is too long
        return ids, dropped

    def _answer(self, answer: Answer, user: str, prompt_ids: list[int]) -> Iterator[str]:
        speaker = answer.speaker
        self.rng, rng = jax.random.split(self.rng)
        pieces, verdict = [], None
        if not self.stop():
            for piece in speaker.policy.stream_text(prompt_ids, self.sampling, rng, stop=self.stop):
                if self.stop_unsafe:
                    verdict = self.moderator([(user, "".join(pieces) + piece)])[0]
                    if not verdict["is_safe"]:
                        verdict = dict(verdict, stopped=True)
                        break
                pieces.append(piece)
                yield piece
        answer.stopped = self.stop()
        text = "".join(pieces)
        if self.moderator is not None and not (verdict or {}).get("stopped"):
            verdict = self.moderator([(user, text)])[0]
        speaker.history.append((user, text))
        if self.moderator is not None:
            speaker.verdicts.append(verdict)

    def respond(self, user: str) -> list[Answer]:
        """One Answer per speaker, in order; consume each one's pieces in turn. Every prompt is
        built first, so policy.TooLong (the message alone does not fit a model) leaves the
        conversation as it was."""
        prompts = [self._fitting_prompt(speaker, user) for speaker in self.speakers]
        self.last_user = user
        answers = []
        for speaker, (ids, dropped) in zip(self.speakers, prompts):
            del speaker.history[:dropped]
            answer = Answer(speaker, dropped)
            answer.pieces = self._answer(answer, user, ids)
            answers.append(answer)
        return answers

    def regenerate(self) -> list[Answer]:
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
