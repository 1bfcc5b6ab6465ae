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
    from jaxalign.models import hf, llama, score
    from jaxalign.models import tokenizer as tokenizer_lib

    mini.write_mini(root / "data", rows=rows, seed=0)
    tok = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(root / "data"), 300, root / "tok")
    cfg = llama.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    hf.save_pretrained(root / policy_dir, cfg, params)
    tok.save_pretrained(str(root / policy_dir))
    for seed, kind in enumerate(score_kinds):
        head_params = score.init_params_from_llama(params["model"], cfg, jax.random.PRNGKey(seed + 1))
        score.save_score_model(root / kind, cfg, head_params, score.ScoreHead(score_type=kind))
    return tok, cfg, params
