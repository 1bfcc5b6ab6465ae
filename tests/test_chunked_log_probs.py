"""Chunked next-token log-probs (config.rl.logits_chunk): the LM head and log-softmax a few positions at a
time give the values and gradients of the whole-logits path, for plain, tied-embedding and LoRA policies."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import models
from jaxalign.models import llama, lora
from jaxalign.objectives.common import chunked_next_token_log_probs, next_token_log_probs
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.rl import roles

CFG = llama.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
IDS = jax.random.randint(jax.random.PRNGKey(1), (3, 11), 0, CFG.vocab_size)
MASK = jnp.ones((3, 11), bool).at[0, :3].set(False)  # one left-padded row


def whole_logits(cfg, lora_settings=None):
    policy = roles.policy_fn(cfg, lora_settings)
    return lambda params, start: next_token_log_probs(policy(params, IDS, MASK, start), IDS[:, start:])


def assert_same_values_and_gradients(cfg, params, lora_settings=None, wrt=lambda p: p,
                                     cases=((4, 0), (3, 5))):
    """log_probs_fn == whole logits at (chunk size, start) cases: 10 positions in chunks of 4 (two chunks
    and a remainder), 5 in chunks of 3 (chunk + remainder)."""
    expected = whole_logits(cfg, lora_settings)
    # a loss that weighs each slot differently, so a misplaced slot changes the gradient
    weights = jax.random.normal(jax.random.PRNGKey(4), (3, 10))
    for chunk, start in cases:
        chunked = roles.log_probs_fn(cfg, lora_settings, chunk)

        def values_and_gradients(fn):
            def loss(p):
                log_probs = fn(p)
                return jnp.sum(weights[:, start:] * log_probs), log_probs
            (_, log_probs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
            return log_probs, grads

        want, g_want = values_and_gradients(lambda p: expected(p, start))
        got, g_got = values_and_gradients(lambda p: chunked(p, IDS, MASK, start))
        assert got.shape == want.shape == (3, 10 - start)
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
        for a, b in zip(jax.tree.leaves(wrt(g_got)), jax.tree.leaves(wrt(g_want))):
            assert float(jnp.abs(b).max()) > 0
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def test_chunked_log_probs_equal_the_whole_logits_values_and_gradients():
    assert_same_values_and_gradients(CFG, models.init_params(CFG, jax.random.PRNGKey(0)))


def test_chunked_log_probs_with_tied_embeddings_and_a_lora_actor():
    tied = dataclasses.replace(CFG, tie_word_embeddings=True)
    assert_same_values_and_gradients(tied, models.init_params(tied, jax.random.PRNGKey(0)), cases=((4, 5),))
    settings = lora.LoraSettings(rank=4, alpha=8.0)
    base = models.init_params(CFG, jax.random.PRNGKey(0))
    mesh = mesh_lib.make_mesh(mesh_lib.MeshSettings(fsdp=-1))
    adapters, _ = lora.init_adapters(llama.Llama(CFG), settings, jax.random.PRNGKey(2), mesh,
                                     mesh_lib.DEFAULT_AXIS_RULES)
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(3), x.shape), adapters)
    # the gradient of the adapters only (the base is frozen)
    assert_same_values_and_gradients(CFG, lora.Adapted(base, adapters), settings, wrt=lambda p: p.adapters,
                                     cases=((4, 5),))


def test_helper_matches_an_independent_log_softmax():
    hidden = jax.random.normal(jax.random.PRNGKey(5), (2, 7, 8))
    kernel = jax.random.normal(jax.random.PRNGKey(6), (8, 13))
    ids = jax.random.randint(jax.random.PRNGKey(7), (2, 7), 0, 13)
    got = chunked_next_token_log_probs(hidden, lambda h: h @ kernel, ids, 3)
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(log_softmax[:, :-1], np.asarray(ids)[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert roles.log_probs_fn(CFG, None, 0) is None  # rl.logits_chunk 0: the policy's whole logits
