"""`jaxalign chat`: the multi-turn template, answers streamed through the sampler, the interactive
loop (two models, /regenerate, /reset, end of input) driven through stdin, a conversation longer
than the model's positions, and Ctrl-C in a real process."""

import dataclasses
import io
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import cli
from jaxalign.data import mini
from jaxalign.generate import chat, policy as policy_lib, sampler
from jaxalign.models import decoder, hf, llama
from jaxalign.models import tokenizer as tokenizer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """model0, model1: two random tiny Llamas; short: one with 64 positions; endless: one that never
    writes a special token (their logits are 0, every other row's maximum is far above)."""
    root = tmp_path_factory.mktemp("chat")
    mini.write_mini(root / "data", rows=60, seed=0)
    tokenizer = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(root / "data"), 300, root / "tok")
    cfg = llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for seed, name, positions in ((0, "model0", 2048), (1, "model1", 2048), (0, "short", 64), (2, "endless", 4096)):
        params = decoder.init_params(cfg, jax.random.PRNGKey(seed))
        params = jax.tree.map(lambda x: x * 10.0, params)  # sharper logits: varied greedy answers
        if name == "endless":
            specials = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens]
            params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, specials].set(0.0)
        hf.save_pretrained(root / name, dataclasses.replace(cfg, max_position_embeddings=positions), params)
        tokenizer.save_pretrained(str(root / name))
    return root, cfg, tokenizer


def test_upstream_dialogue_matches_the_spec():
    text = chat.upstream_dialogue([("hi", " hello"), ("and?", " more")], "bye", "</s>")
    assert text == ("BEGINNING OF CONVERSATION: USER: hi ASSISTANT: hello</s>USER: and? ASSISTANT: more</s>"
                    "USER: bye ASSISTANT:")
    assert chat.upstream_dialogue([], "q", "</s>") == "BEGINNING OF CONVERSATION: USER: q ASSISTANT:"


def test_streamed_tokens_equal_the_sampler(two_models):
    """The policy's stream (left-padded to the prompt bucket, EOS dropped) draws what the batch
    sampler draws for the same prompt and rng, at temperature 1."""
    root, _, tokenizer = two_models
    policy = policy_lib.load(root / "model0")
    prompt = policy.encode(chat.upstream_dialogue([], "How do I stay safe online?", tokenizer.eos_token))
    sampling = sampler.SamplingConfig(max_new_tokens=12, temperature=1.0)
    streamed = list(policy.stream(prompt, sampling, jax.random.PRNGKey(3)))
    width = policy_lib.PROMPT_BUCKET
    ids = np.full((1, width), tokenizer.pad_token_id, np.int32)
    ids[0, width - len(prompt):] = prompt
    mask = np.arange(width)[None] >= width - len(prompt)
    out = sampler.sample(policy.params, policy.cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(3),
                         dataclasses.replace(policy.sampling(sampling), cache_segments=1))
    expected = np.asarray(out.sequences)[0, width:][np.asarray(out.response_mask)[0]].tolist()
    assert streamed == [t for t in expected if t != tokenizer.eos_token_id] and len(streamed) > 0


def test_chat_loop_two_models_regenerate_reset_and_eof(two_models, monkeypatch, capsys):
    root, _, _ = two_models
    script = "hello there\n/regenerate\nsecond question\n/help\n/reset\n/bogus\nafter reset\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    argv = ["chat", "--model", str(root / "model0"), str(root / "model1"), "--temperature", "0",
            "--max-new-tokens", "6"]
    assert cli.main(argv) == 0  # end of input leaves cleanly
    out = capsys.readouterr().out
    answers = [line for line in out.splitlines() if "[1:" in line or "[2:" in line]
    assert len(answers) == 8  # 4 answered turns (incl. the regenerated one) x 2 models
    text = lambda line: line.split("] ", 1)[-1]  # noqa: E731
    assert [text(a) for a in answers[0:2]] == [text(a) for a in answers[2:4]]  # greedy: regenerated == first
    assert text(answers[0]) != text(answers[1])  # two different models answered
    assert "(new conversation)" in out and "/regenerate answers" in out and "unknown command /bogus" in out


def test_chat_history_grows_and_reset_clears(two_models):
    root, _, _ = two_models
    sampling = sampler.SamplingConfig(max_new_tokens=4, temperature=0.0)
    session = chat.Chat([chat.Speaker("m", policy_lib.load(root / "model0"))], sampling)
    for question in ("one", "two"):
        for answer in session.respond(question):
            "".join(answer.pieces)
    assert [q for q, _ in session.speakers[0].history] == ["one", "two"]
    for answer in session.regenerate():
        list(answer.pieces)
    assert [q for q, _ in session.speakers[0].history] == ["one", "two"]
    session.reset()
    assert session.speakers[0].history == [] and session.last_user is None
    with pytest.raises(ValueError, match="nothing to regenerate"):
        session.regenerate()


def test_a_conversation_past_the_positions_drops_its_oldest_turns(two_models, monkeypatch, capsys):
    """64 positions, 16 new tokens: later turns leave out the oldest ones with a notice, every prompt
    the model reads fits, a message too long alone is refused in one line naming both numbers and
    the chat goes on; more new tokens than positions is refused at the start."""
    root, _, _ = two_models
    session = chat.Chat([chat.Speaker("s", policy_lib.load(root / "short"))],
                        sampler.SamplingConfig(max_new_tokens=16, temperature=0.0))
    fed = []
    stream = policy_lib.Policy.stream

    def recording(self, prompt_ids, sampling, rng, stop=None):
        fed.append(len(prompt_ids) + sampling.max_new_tokens)
        return stream(self, prompt_ids, sampling, rng, stop)

    monkeypatch.setattr(policy_lib.Policy, "stream", recording)
    dropped = []
    for question in ("How do I bake bread?", "And then?", "Why is that?", "What else?", "Thanks, bye."):
        for answer in session.respond(question):
            "".join(answer.pieces)
            dropped.append(answer.dropped)
    assert max(fed) <= 64 and sum(dropped) > 0 and dropped[0] == 0
    assert session.speakers[0].history[-1][0] == "Thanks, bye." and len(session.speakers[0].history) < 5
    history = list(session.speakers[0].history)
    with pytest.raises(policy_lib.TooLong, match=r"the prompt's \d+ tokens \+ 16 new tokens = \d+ exceed "
                                                 r"max_position_embeddings 64"):
        session.respond("bread " * 60)
    assert session.speakers[0].history == history  # a refused message changes nothing
    monkeypatch.setattr(sys, "stdin", io.StringIO("How do I bake bread?\n" + "bread " * 60 + "\nAnd then?\n"))
    assert cli.main(["chat", "--model", str(root / "short"), "--temperature", "0", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    refused = [line for line in out.splitlines() if "not answered" in line]
    assert len(refused) == 1 and "+ 16 new tokens" in refused[0] and "max_position_embeddings 64" in refused[0]
    assert out.count("[short] ") == 2
    capsys.readouterr()
    assert cli.main(["chat", "--model", str(root / "short"), "--max-new-tokens", "64"]) == 1
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("jaxalign chat: error: the prompt's") and "+ 64 new tokens" in error
    assert "max_position_embeddings 64" in error


@pytest.mark.parametrize("unsafe_bias", [10.0, -10.0])
def test_chat_with_moderation_verdicts_and_stop_at_the_first_unsafe_token(two_models, tmp_path, monkeypatch, capsys,
                                                                         unsafe_bias):
    """A moderation model that calls everything unsafe (bias +10) stops every answer before its first
    token; one that calls everything safe (bias -10) lets the whole answer through. Each answer's
    verdict is printed."""
    from jaxalign.models import moderation as mm

    root, cfg, tokenizer = two_models
    _, params = hf.from_pretrained(root / "model0")
    head = mm.ModerationHead(max_length=64)
    moderation = mm.init_params_from_backbone(params["model"], cfg, jax.random.PRNGKey(3), head)
    moderation["unsafe_head"]["bias"] = np.full_like(np.asarray(moderation["unsafe_head"]["bias"]), unsafe_bias)
    mm.save_moderation_model(tmp_path / "moderation", cfg, moderation, head)
    tokenizer.save_pretrained(str(tmp_path / "moderation"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n"))
    argv = ["chat", "--model", str(root / "model0"), "--temperature", "0", "--max-new-tokens", "6",
            "--moderation", str(tmp_path / "moderation"), "--stop-unsafe"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    answer = next(line for line in out.splitlines() if line.startswith(">>> [model0]") or line.startswith("[model0]"))
    verdict = next(line for line in out.splitlines() if line.strip().startswith("moderation:"))
    if unsafe_bias > 0:
        assert answer.rstrip().endswith("]") and "UNSAFE" in verdict and "stopped at the first unsafe token" in verdict
    else:
        assert len(answer.split("] ", 1)[-1]) > 0 and "safe, P(unsafe) 0.00" in verdict


class _Output:
    """What a child process writes to a pipe, read on a thread so the test can wait for a text."""

    def __init__(self, pipe):
        self.text, self._pipe = "", pipe
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for chunk in iter(lambda: os.read(self._pipe.fileno(), 4096), b""):
            self.text += chunk.decode("utf-8", "replace")

    def wait_for(self, needle: str, after: int = 0, timeout: float = 180.0) -> int:
        """Index just past the first `needle` at or after `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.text.find(needle, after)
            if found >= 0:
                return found + len(needle)
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} did not appear; output so far: {self.text[-2000:]!r}")


def test_ctrl_c_stops_the_answer_and_a_second_one_exits_130(two_models):
    """A real `jaxalign chat` process on a model that never ends its answer (3000 new tokens): SIGINT
    while it answers stops the answer and the prompt returns (and answers a command); SIGINT at the
    prompt says how to leave; a second one exits 130 with one line and no traceback."""
    root, _, _ = two_models
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="", JAX_PLATFORMS="cpu")
    process = subprocess.Popen([sys.executable, "-m", "jaxalign", "chat", "--model", str(root / "endless"),
                                "--temperature", "0", "--max-new-tokens", "3000"], cwd=REPO, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = _Output(process.stdout), _Output(process.stderr)
    try:
        at = out.wait_for(">>> ")
        process.stdin.write(b"hello there\n")
        process.stdin.flush()
        at = out.wait_for("[endless] ", at)
        out.wait_for(" ", at)  # some of the answer is out: it is being streamed
        process.send_signal(signal.SIGINT)
        at = out.wait_for(" (stopped)\n", at)
        answer = out.text[out.text.rfind("[endless] ", 0, at):at]
        assert len(answer) < 3000  # cut short: 3000 tokens would be far longer
        at = out.wait_for(">>> ", at)
        process.stdin.write(b"/help\n")
        process.stdin.flush()
        at = out.wait_for("/regenerate answers", at)
        at = out.wait_for(">>> ", at)
        process.send_signal(signal.SIGINT)
        at = out.wait_for("(Ctrl-C again to leave, or /quit)", at)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.kill()
    time.sleep(0.2)  # the reader threads drain the pipes
    assert "Traceback" not in err.text and "KeyboardInterrupt" not in err.text, err.text
    assert err.text.strip().splitlines()[-1] == "jaxalign chat: interrupted"
