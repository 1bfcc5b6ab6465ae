"""Shared pytest setup: 8 simulated CPU devices (set before JAX initialises), shared data paths."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_HEAD = REPO_ROOT.parent / "shared" / "data" / "pku_saferlhf_head"


@pytest.fixture(scope="session")
def shared_head_dir() -> pathlib.Path:
    """The 141 real release rows beside the checkout; tests using it skip when absent."""
    if not (SHARED_HEAD / "data" / "Alpaca-7B" / "test.jsonl").exists():
        pytest.skip("../shared/data/pku_saferlhf_head is not present")
    return SHARED_HEAD


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory) -> pathlib.Path:
    """Read-only: the mini dataset (`data/`, 150 rows) and a 300-token BPE tokenizer (`tokenizer/`)."""
    from jaxalign.data import mini
    from jaxalign.models import tokenizer as tokenizer_lib

    root = tmp_path_factory.mktemp("mini")
    mini.write_mini(root / "data", rows=150, seed=0)
    tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(root / "data"), 300, root / "tokenizer")
    return root


def tiny_rl_inputs(root: pathlib.Path, rows: int = 150, policy_dir: str = "sft", score_kinds=("reward", "cost")):
    """What an RL / preference stage test needs, in `root`: the mini dataset (`data/`, `rows` rows),
    a 300-token BPE tokenizer (`tok/`), a random 1-layer Llama with that tokenizer (`policy_dir/`)
    and random score models on its backbone (`reward/`, `cost/`). -> (tokenizer, cfg, params)."""
    import jax

    from jaxalign.data import mini
    from jaxalign.models import decoder, hf, llama, score
    from jaxalign.models import tokenizer as tokenizer_lib

    mini.write_mini(root / "data", rows=rows, seed=0)
    tok = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(root / "data"), 300, root / "tok")
    cfg = llama.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    params = decoder.init_params(cfg, jax.random.PRNGKey(0))
    hf.save_pretrained(root / policy_dir, cfg, params)
    tok.save_pretrained(str(root / policy_dir))
    for seed, kind in enumerate(score_kinds):
        head_params = score.init_params_from_backbone(params["model"], cfg, jax.random.PRNGKey(seed + 1))
        score.save_score_model(root / kind, cfg, head_params, score.ScoreHead(score_type=kind))
    return tok, cfg, params


def random_params(cfg, seed: int = 0):
    """Random causal-LM params of cfg's family, N(0, 0.3) for every leaf (norm scales and biases too, so a
    misplaced norm or bias cannot hide), built in numpy without an init compile."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxalign import models

    shapes = jax.eval_shape(models.causal_lm(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), nn.meta.unbox(shapes["params"]))


def hf_logits(model, ids, mask):
    """A transformers causal LM's logits [B, T, V] of left-padded rows, positions from the mask as ours."""
    import numpy as np
    import torch

    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                     position_ids=torch.tensor(positions)).logits.numpy()


def left_padded(rows, width: int, seed: int, vocab_size: int, pad: int = 0):
    """ids [B, width] int32 and mask [B, width] bool: row b holds rows[b] random ids in [3, vocab_size)
    at its right end, `pad` before them."""
    import numpy as np

    rng = np.random.RandomState(seed)
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for row, n in enumerate(rows):
        ids[row, width - n:] = rng.randint(3, vocab_size, n)
        mask[row, width - n:] = True
    return ids, mask


def transformers_round_trip(path: pathlib.Path, cfg, params, logits_fn):
    """hf.save_pretrained(path, cfg, params) -> transformers' AutoModelForCausalLM loads it (its class is
    cfg's hf_architecture, its logits of left-padded rows equal logits_fn(cfg, params, ids, mask)'s) -> its
    save_pretrained -> hf.from_pretrained gives the same params. Returns (model, config.json, reloaded cfg)."""
    import json

    import jax
    import numpy as np
    import torch
    import transformers

    from jaxalign.models import hf

    hf.save_pretrained(path, cfg, params)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == cfg.model_type and config["architectures"] == [cfg.hf_architecture]
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == cfg.hf_architecture
    ids, mask = left_padded([11, 6], 11, seed=2, vocab_size=cfg.vocab_size)
    ours = np.asarray(logits_fn(cfg, params, ids, mask))
    np.testing.assert_allclose(hf_logits(model, ids, mask)[mask], ours[mask], atol=1e-4, rtol=0)
    with torch.no_grad():
        model.save_pretrained(path / "from_hf")
    cfg2, params2 = hf.from_pretrained(path / "from_hf")
    assert type(cfg2) is type(cfg)
    assert jax.tree_util.tree_structure(params2) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return model, config, cfg2


def greedy_matches_transformers(model, ids, mask, n: int = 8, pad: int = 0) -> None:
    """The project's greedy sampler, on the params and config read from transformers' `model`, emits
    the tokens of model.generate (n each, no EOS) for the left-padded rows ids / mask [B, S]."""
    import jax
    import numpy as np
    import torch

    from jaxalign import models
    from jaxalign.generate import sampler
    from jaxalign.models import hf

    cfg = models.config_from_hf(model.config.to_dict())
    params = hf.params_from_hf_tensors(cfg, {k: v.numpy() for k, v in model.state_dict().items()})
    sampling = sampler.SamplingConfig(max_new_tokens=n, temperature=0.0, pad_token_id=pad)
    out = sampler.sample(params, cfg, ids, mask, jax.random.PRNGKey(0), sampling)
    expected = model.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                              do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                              pad_token_id=pad).numpy()[:, ids.shape[1]:]
    np.testing.assert_array_equal(np.asarray(out.sequences)[:, ids.shape[1]:], expected)
    assert len(set(expected.ravel().tolist())) > 3  # not a degenerate repeat of one token
