"""layer_loop: the layer scan is unrolled on one CPU device, rolled inside forward_only() for models at
least ROLLED_FORWARD_MIN_HIDDEN wide, and the two give the same numbers."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models import decoder, layer_loop, llama


def test_forward_only_rolls_wide_models_and_changes_no_number():
    wide, narrow = layer_loop.ROLLED_FORWARD_MIN_HIDDEN, 64
    assert layer_loop.unroll_layers()  # the suite runs on one CPU device
    assert layer_loop.unroll_training(wide) and layer_loop.unroll_training(narrow)
    with layer_loop.forward_only():
        assert not layer_loop.unroll_training(wide)
        assert layer_loop.unroll_training(narrow)  # tiny models: rolled was 0.85x
    assert layer_loop.unroll_training(wide)  # the context ends

    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=wide, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model, params = llama.Llama(cfg), decoder.init_params(cfg, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 64)

    def forward(rolled):
        def apply(p):
            if rolled:
                with layer_loop.forward_only():
                    return model.apply({"params": p}, ids).logits
            return model.apply({"params": p}, ids).logits
        return jax.jit(apply)

    assert "while" in forward(True).lower(params).as_text() and "while" not in forward(False).lower(params).as_text()
    np.testing.assert_allclose(forward(True)(params), forward(False)(params), atol=1e-5)
    assert float(jnp.abs(forward(True)(params)).max()) > 0
