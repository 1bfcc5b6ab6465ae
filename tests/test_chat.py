"""`jaxalign chat`: the multi-turn template, streamed decoding equal to the sampler, and the
interactive loop (two models, /regenerate, /reset, end of input) driven through stdin."""

import io
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import cli
from jaxalign.data import mini
from jaxalign.generate import chat, sampler
from jaxalign.models import hf, llama
from jaxalign.models import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    mini.write_mini(root / "data", rows=60, seed=0)
    tokenizer = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(root / "data"), 300, root / "tok")
    cfg = llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for seed in (0, 1):
        params = llama.init_params(cfg, jax.random.PRNGKey(seed))
        params = jax.tree.map(lambda x: x * 10.0, params)  # sharper logits: varied greedy answers
        hf.save_pretrained(root / f"model{seed}", cfg, params)
        tokenizer.save_pretrained(str(root / f"model{seed}"))
    return root, cfg, tokenizer


def test_upstream_dialogue_matches_the_spec():
    text = chat.upstream_dialogue([("hi", " hello"), ("and?", " more")], "bye", "</s>")
    assert text == ("BEGINNING OF CONVERSATION: USER: hi ASSISTANT: hello</s>USER: and? ASSISTANT: more</s>"
                    "USER: bye ASSISTANT:")
    assert chat.upstream_dialogue([], "q", "</s>") == "BEGINNING OF CONVERSATION: USER: q ASSISTANT:"


def test_streamed_greedy_tokens_equal_the_sampler(two_models):
    root, cfg, tokenizer = two_models
    _, params = hf.from_pretrained(root / "model0")
    prompt = tokenizer(chat.upstream_dialogue([], "How do I stay safe online?", tokenizer.eos_token))["input_ids"]
    sampling = sampler.SamplingConfig(max_new_tokens=12, temperature=0.0, eos_token_ids=(tokenizer.eos_token_id,),
                                      pad_token_id=tokenizer.pad_token_id)
    streamed = list(chat.stream_tokens(params, cfg, prompt, sampling, jax.random.PRNGKey(0)))
    ids = jnp.asarray([prompt], jnp.int32)
    out = sampler.sample(params, cfg, ids, jnp.ones(ids.shape, bool), jax.random.PRNGKey(0), sampling)
    expected = np.asarray(out.sequences)[0, len(prompt):][np.asarray(out.response_mask)[0]].tolist()
    expected = [t for t in expected if t != tokenizer.eos_token_id]
    assert streamed == expected and len(streamed) > 0


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
    root, cfg, tokenizer = two_models
    _, params = hf.from_pretrained(root / "model0")

    class Placed:
        pass

    policy = Placed()
    policy.params, policy.cfg = params, cfg
    sampling = sampler.SamplingConfig(max_new_tokens=4, temperature=0.0, eos_token_ids=(tokenizer.eos_token_id,),
                                      pad_token_id=tokenizer.pad_token_id)
    session = chat.Chat([chat.Speaker("m", policy)], tokenizer, sampling)
    for question in ("one", "two"):
        for _, pieces in session.respond(question):
            "".join(pieces)
    assert [q for q, _ in session.speakers[0].history] == ["one", "two"]
    for _, pieces in session.regenerate():
        list(pieces)
    assert [q for q, _ in session.speakers[0].history] == ["one", "two"]
    session.reset()
    assert session.speakers[0].history == [] and session.last_user is None
    with pytest.raises(ValueError, match="nothing to regenerate"):
        session.regenerate()


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
