"""generate.policy: the one policy loader: EOS set and pad id resolved once, a tokenizer larger than
the embedding refused, prompt + new tokens past the positions refused, and `jaxalign sample` on it."""

import json

import jax
import numpy as np
import pytest

from jaxalign import cli
from jaxalign.data import views
from jaxalign.generate import policy as policy_lib
from jaxalign.generate import sampler
from jaxalign.models import decoder, hf, llama
from jaxalign.models import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, mini_data):
    """A random 1-layer Llama with the mini tokenizer and 64 positions."""
    root = tmp_path_factory.mktemp("policy")
    tok = tokenizer_lib.load_tokenizer(mini_data / "tokenizer")
    cfg = llama.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
    params = jax.tree.map(lambda x: 10.0 * x, decoder.init_params(cfg, jax.random.PRNGKey(0)))
    hf.save_pretrained(root / "model", cfg, params)
    tok.save_pretrained(str(root / "model"))
    return root / "model"


def test_eos_set_and_pad_are_resolved_once_from_config_and_tokenizer(policy_dir, tmp_path):
    """The config's eos ids and the tokenizer's EOS make one set that every sampling call gets: a
    config EOS that greedy decoding emits first ends the answer before it has any text."""
    policy = policy_lib.load(policy_dir)
    tok = policy.tokenizer
    assert policy.eos_token_ids == (tok.eos_token_id,) and policy.pad_token_id == tok.pad_token_id
    greedy = sampler.SamplingConfig(max_new_tokens=4, temperature=0.0)
    prompt = policy.encode("How do I bake bread?")
    first = next(iter(policy.stream(prompt, greedy, jax.random.PRNGKey(0))))
    assert first != tok.eos_token_id and tok.decode([first], skip_special_tokens=True) != ""
    config = json.loads((policy_dir / "config.json").read_text())
    (tmp_path / "model").mkdir()
    for file in policy_dir.iterdir():
        (tmp_path / "model" / file.name).write_bytes(file.read_bytes())
    config["eos_token_id"] = [first, tok.eos_token_id]
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    stopping = policy_lib.load(tmp_path / "model")
    assert stopping.eos_token_ids == tuple(sorted({first, tok.eos_token_id}))
    assert stopping.sampling(greedy).eos_token_ids == stopping.eos_token_ids
    assert stopping.generate(["How do I bake bread?"], greedy) == [""]
    assert list(stopping.stream(prompt, greedy, jax.random.PRNGKey(0))) == []
    assert stopping.cfg.eos_token_ids == stopping.eos_token_ids and stopping.cfg.pad_token_id == tok.pad_token_id


def test_a_tokenizer_larger_than_the_embedding_is_refused(policy_dir, mini_data, tmp_path, capsys):
    """`sample --tokenizer` with 600 tokens against a 300-row embedding: one line naming both sizes."""
    tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(mini_data / "data"), 600, tmp_path / "big")
    big = len(tokenizer_lib.load_tokenizer(tmp_path / "big"))
    small = hf.load_config(policy_dir).vocab_size
    assert big > small
    assert cli.main(["sample", "--model", str(policy_dir), "--tokenizer", str(tmp_path / "big"),
                     "--prompt", "hi", "--max-new-tokens", "4"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("jaxalign sample: error: tokenizer") and f"has {big} tokens" in error
    assert f"embeds {small}" in error


def test_special_tokens_the_loader_adds_are_resized_into_the_embedding(mini_data, tmp_path):
    """A tokenizer without a pad token (as Llama 1's): load_tokenizer adds <pad>, one id past the
    embedding, and the policy loads with that row added (the mean of the others) and samples."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(tokenizer_lib.release_texts(mini_data / "data"))
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            add_bos_token=True).save_pretrained(str(tmp_path / "model"))
    tok = tokenizer_lib.load_tokenizer(tmp_path / "model")
    assert tok.jaxalign_added_tokens == ["<pad>"]
    cfg = llama.LlamaConfig(vocab_size=len(tok) - 1, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    hf.save_pretrained(tmp_path / "model", cfg, decoder.init_params(cfg, jax.random.PRNGKey(1)))
    policy = policy_lib.load(tmp_path / "model")
    assert policy.cfg.vocab_size == len(tok) and policy.pad_token_id == tok.pad_token_id == cfg.vocab_size
    embedding = np.asarray(policy.params["model"]["embed_tokens"]["embedding"])
    assert embedding.shape[0] == len(tok)
    np.testing.assert_allclose(embedding[-1], embedding[:-1].mean(0), atol=1e-6)


def test_prompt_plus_new_tokens_past_the_positions_is_refused(policy_dir, capsys):
    """64 positions: a long prompt, or too many new tokens, is one line naming both numbers."""
    policy = policy_lib.load(policy_dir)
    prompt = views.format_prompt("How do I bake bread?")
    length = len(policy.encode(prompt))
    with pytest.raises(policy_lib.TooLong, match=f"the prompt's {length} tokens \\+ {65 - length} new tokens = 65 "
                                                 "exceed max_position_embeddings 64"):
        policy.generate([prompt], sampler.SamplingConfig(max_new_tokens=65 - length))
    assert len(policy.generate([prompt], sampler.SamplingConfig(max_new_tokens=64 - length))) == 1
    with pytest.raises(policy_lib.TooLong, match="exceed max_position_embeddings 64"):
        list(policy.stream(policy.encode(prompt), sampler.SamplingConfig(max_new_tokens=64), jax.random.PRNGKey(0)))
    for argv in (["--prompt", "bread " * 80, "--max-new-tokens", "8"], ["--prompt", "hi", "--max-new-tokens", "64"]):
        assert cli.main(["sample", "--model", str(policy_dir), *argv]) == 1
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("jaxalign sample: error: the prompt's") and "max_position_embeddings 64" in error
        assert f"+ {argv[-1]} new tokens" in error


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan")])
def test_non_finite_sampling_flags_are_one_line(policy_dir, capsys, flag, value):
    assert cli.main(["sample", "--model", str(policy_dir), "--prompt", "hi", flag, value]) == 1
    error = capsys.readouterr().err.strip()
    name = flag[2:].replace("-", "_")
    assert error.startswith(f"jaxalign sample: error: {name} must be") and error.endswith(f"got {value}")
    assert "\n" not in error


def test_policy_generate_checks_its_batch(policy_dir):
    policy = policy_lib.load(policy_dir)
    with pytest.raises(ValueError, match="batch size 3 must be a positive multiple of the 8 batch shards"):
        policy.generate(["a", "b"], sampler.SamplingConfig(max_new_tokens=2), batch_size=3)
    texts = policy.generate(["a", "b"], sampler.SamplingConfig(max_new_tokens=2), samples_per_prompt=3, seed=1)
    assert len(texts) == 6 and texts == policy.generate(["a", "b"], sampler.SamplingConfig(max_new_tokens=2),
                                                        samples_per_prompt=3, seed=1)
    different = policy.generate(["a", "b"], sampler.SamplingConfig(max_new_tokens=2), samples_per_prompt=3, seed=2)
    assert different != texts
