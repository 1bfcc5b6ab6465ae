"""jaxalign.train.optim: the upstream weight-decay groups and the HF warmup + cosine schedule."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxalign.models import llama
from jaxalign.train import optim


def _train_config(**kw):
    base = dict(learning_rate=1e-3, lr_schedule="cosine", warmup_ratio=0.1, weight_decay=0.1, max_grad_norm=1.0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _tiny_params():
    cfg = llama.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
    )
    # shapes from tracing only (no compile), values from numpy
    shapes = jax.eval_shape(
        lambda r: nn.meta.unbox(llama.Llama(cfg).init(r, jnp.zeros((1, 1), jnp.int32))["params"]), jax.random.PRNGKey(0)
    )
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32)), shapes)


def test_weight_decay_mask_matches_upstream_groups():
    params = _tiny_params()
    flat = {
        "/".join(str(k.key) for k in path): value
        for path, value in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))
    }
    # per-layer norms and biases: no decay; final norm, embeddings, kernels: decay (as safe-rlhf)
    assert flat["model/layers/input_layernorm/scale"] is False
    assert flat["model/layers/post_attention_layernorm/scale"] is False
    assert flat["model/layers/self_attn/q_proj/bias"] is False
    assert flat["model/norm/scale"] is True
    assert flat["model/embed_tokens/embedding"] is True
    assert flat["model/layers/self_attn/q_proj/kernel"] is True
    assert flat["model/layers/mlp/down_proj/kernel"] is True
    assert flat["lm_head/kernel"] is True


def test_decay_is_applied_only_where_the_mask_says():
    params = _tiny_params()
    tx = optim.make_optimizer(_train_config(warmup_ratio=0.0, lr_schedule="constant"), num_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(zeros, params)
    # zero gradients: AdamW's update is -lr * wd * param on decayed leaves, 0 elsewhere
    np.testing.assert_allclose(updates["model"]["norm"]["scale"], -1e-3 * 0.1 * params["model"]["norm"]["scale"], rtol=1e-6)
    assert not np.any(updates["model"]["layers"]["input_layernorm"]["scale"])
    assert not np.any(updates["model"]["layers"]["self_attn"]["q_proj"]["bias"])


@pytest.mark.parametrize("kind", ["cosine", "constant"])
def test_schedule_matches_hf_warmup_formula(kind):
    steps, lr = 100, 1e-3
    schedule = optim.make_schedule(_train_config(lr_schedule=kind, warmup_ratio=0.05, learning_rate=lr), steps)
    warmup = int(0.05 * steps)
    for s in [0, 1, 4, 5, 6, 50, 99]:
        if s < warmup:
            expected = lr * s / warmup
        elif kind == "constant":
            expected = lr
        else:
            expected = lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        assert float(schedule(s)) == pytest.approx(expected, rel=1e-5, abs=1e-9), s


def test_unknown_schedule_names_the_field():
    with pytest.raises(ValueError, match="lr_schedule"):
        optim.make_schedule(_train_config(lr_schedule="linear"), 10)
