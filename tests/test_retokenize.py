"""Re-tokenisation for a reward / cost model trained with another tokenizer (upstream safe-rlhf
`safe_rlhf/utils.py::batch_retokenize`): the actor's sequences are decoded and re-encoded with the
score model's own tokenizer; critics must share the actor's tokenizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from jaxalign.rl import roles
from jaxalign.rl.rollout import end_scores, retokenize
from jaxalign.train import metrics as metrics_lib


def _other_score_model(root, vocab: int, kind: str = "reward"):
    """A second BPE (`vocab` tokens) on the same mini data and a random score model with that
    vocabulary, saved with its tokenizer in root/<kind>_other. -> (tokenizer, module, params)."""
    from jaxalign.models import decoder, llama, score
    from jaxalign.models import tokenizer as tokenizer_lib

    tok = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(root / "data"), vocab, root / "tok_other")
    cfg = llama.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    params = score.init_params_from_backbone(decoder.init_params(cfg, jax.random.PRNGKey(7))["model"], cfg,
                                          jax.random.PRNGKey(8))
    head = score.ScoreHead(score_type=kind)
    score.save_score_model(root / f"{kind}_other", cfg, params, head)
    tok.save_pretrained(str(root / f"{kind}_other"))
    return tok, head.model(cfg), params



def _actor_batch(tok, pairs, prompt_length: int, new_tokens: int):
    """Left-padded prompt (BOS + prompt) + response + EOS + right padding, as a rollout. -> ids, mask [B,L]."""
    ids = np.full((len(pairs), prompt_length + new_tokens), tok.pad_token_id, np.int32)
    mask = np.zeros(ids.shape, bool)
    for row, (prompt, response) in enumerate(pairs):
        p = tok(prompt)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids[row, prompt_length - len(p):prompt_length], ids[row, prompt_length:prompt_length + len(r)] = p, r
        mask[row, prompt_length - len(p):prompt_length + len(r)] = True
    return ids, mask


PAIRS = [("BEGINNING OF CONVERSATION: USER: How do I bake bread? ASSISTANT:", " Mix flour, water and yeast."),
         ("BEGINNING OF CONVERSATION: USER: Tell me a secret. ASSISTANT:", " No."),
         ("BEGINNING OF CONVERSATION: USER: hi ASSISTANT:", " Hello! How can I help you today with your question?")]


def test_retokenized_end_score_equals_scoring_the_text_with_the_models_own_tokenizer(tmp_path):
    """The actor's left-padded prompt + response (its 300-token BPE) re-tokenised for a score model
    trained with a 280-token BPE, right-padded to a static length: its end score equals scoring each
    text alone, encoded by the score model's tokenizer with its EOS appended, unpadded, at its last token."""
    actor_tok, _, _ = conftest.tiny_rl_inputs(tmp_path, rows=20, score_kinds=())
    other_tok, module, params = _other_score_model(tmp_path, 280)
    ids, mask = _actor_batch(actor_tok, PAIRS, 64, 48)

    new_ids, new_mask = retokenize(ids, mask, actor_tok, other_tok, 128)
    assert new_ids.shape == new_mask.shape == (len(PAIRS), 128) and new_ids.dtype == np.int32
    assert np.all(new_ids[~new_mask] == other_tok.pad_token_id)
    assert not np.array_equal(new_mask.sum(-1), mask.sum(-1))  # the other tokenizer splits differently
    got = end_scores(roles.score_role_fn(module), params, jnp.asarray(new_ids), jnp.asarray(new_mask))

    for row, (prompt, response) in enumerate(PAIRS):
        alone = other_tok(prompt + response + other_tok.eos_token)["input_ids"]
        assert alone[0] == other_tok.bos_token_id and alone[-1] == other_tok.eos_token_id
        scores = module.apply({"params": params}, jnp.asarray([alone], jnp.int32),
                              attention_mask=jnp.ones((1, len(alone)), bool)).scores
        np.testing.assert_allclose(float(got[row]), float(scores[0, -1, 0]), rtol=1e-5, atol=1e-5)

    # Cut to a static length shorter than a row: the first `length` tokens are kept.
    short_ids, short_mask = retokenize(ids, mask, actor_tok, other_tok, 8)
    assert short_mask.all() and np.array_equal(short_ids, new_ids[:, :8])


def test_own_tokenizer_marks_scorers_and_refuses_critics(tmp_path):
    """A score-model dir without tokenizer files, or with the actor's, is not re-tokenised; one with
    another tokenizer is for the reward / cost role and refused for a critic (one line naming the dir)."""
    actor_tok, _, _ = conftest.tiny_rl_inputs(tmp_path, rows=20)
    _other_score_model(tmp_path, 280)
    assert roles.own_tokenizer("reward", str(tmp_path / "reward"), actor_tok) is None  # no tokenizer files
    actor_tok.save_pretrained(str(tmp_path / "reward"))
    assert roles.own_tokenizer("reward", str(tmp_path / "reward"), actor_tok) is None  # the same tokenizer
    own = roles.own_tokenizer("cost", str(tmp_path / "reward_other"), actor_tok)
    assert own is not None and len(own) == 280
    with pytest.raises(ValueError, match=r"reward_critic model .*reward_other.*critic must use the actor's tokenizer"):
        roles.own_tokenizer("reward_critic", str(tmp_path / "reward_other"), actor_tok)


def test_jaxalign_train_ppo_lag_with_a_reward_model_of_another_tokenizer(tmp_path, capsys):
    """`jaxalign train --config configs/ppo_lag_tiny.py` for 2 iterations with a reward model whose
    280-token vocabulary does not cover the actor's 300 tokens (refused before re-tokenisation); the
    reward critic is a score model of the actor's tokenizer."""
    from jaxalign import cli

    tok, _, _ = conftest.tiny_rl_inputs(tmp_path, rows=150, policy_dir="sft")
    other_tok, _, _ = _other_score_model(tmp_path, 280)
    assert len(other_tok) < len(tok)
    workdir = tmp_path / "run"
    argv = ["train", "--config", "configs/ppo_lag_tiny.py", "--workdir", str(workdir),
            f"--config.model.init_path={tmp_path / 'sft'}", f"--config.data.source={tmp_path / 'data'}",
            f"--config.rl.reward_model_path={tmp_path / 'reward_other'}",
            f"--config.rl.reward_critic_model_path={tmp_path / 'reward'}",
            f"--config.rl.cost_model_path={tmp_path / 'cost'}",
            "--config.rl.prompt_length=40", "--config.rl.max_new_tokens=8", "--config.data.batch_size=8",
            "--config.train.num_steps=2", "--config.checkpoint.save_every=2"]
    assert cli.main(argv) == 0
    records = metrics_lib.read_metrics(workdir)
    assert [m["step"] for m in records] == [1, 2]
    for key in ("reward", "cost", "reward_critic_loss", "actor_loss", "nonfinite/reward"):
        assert np.isfinite(records[-1][key]), key
    assert records[-1]["nonfinite/reward"] == 0
    # The critic of the reward model's own tokenizer is refused.
    argv = [a.replace(str(tmp_path / "reward"), str(tmp_path / "reward_other")) if "reward_critic" in a else a
            for a in argv]
    argv[argv.index("--workdir") + 1] = str(tmp_path / "run_critic")
    assert cli.main(argv) == 1
    assert "critic must use the actor's tokenizer" in capsys.readouterr().err
