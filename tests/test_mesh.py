"""jaxalign.parallel.mesh: mesh sizes, and a sharded train step equals the single-device one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from jaxalign.models import llama
from jaxalign.objectives import sft
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import loop, optim, state as state_lib


def _mesh_config(data=1, fsdp=-1, tensor=1):
    config = base.get_config().mesh
    config.data, config.fsdp, config.tensor = data, fsdp, tensor
    return config


def test_mesh_shape_resolves_minus_one_and_validates():
    assert mesh_lib.mesh_shape(_mesh_config(2, -1, 2), 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="data\\*fsdp\\*tensor = 6"):
        mesh_lib.mesh_shape(_mesh_config(1, 3, 2), 8)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_lib.mesh_shape(_mesh_config(1, -1, 3), 8)
    with pytest.raises(ValueError, match="at most one axis"):
        mesh_lib.mesh_shape(_mesh_config(-1, -1, 1), 8)


def test_axis_rules_reject_unknown_mesh_axes():
    config = _mesh_config()
    config.axis_rules = (("embed", "model"),)
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        mesh_lib.axis_rules(config)


def _tiny_llama():
    return llama.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )


def _batch(rng, batch_size=8, length=12, vocab=64):
    ids = rng.integers(4, vocab, size=(batch_size, length)).astype(np.int32)
    lengths = rng.integers(6, length + 1, size=batch_size)
    attention = np.arange(length)[None] < lengths[:, None]
    loss_mask = attention & (np.arange(length)[None] >= 3)
    return {"input_ids": np.where(attention, ids, 0), "attention_mask": attention, "loss_mask": loss_mask}


def _one_step(mesh, cfg, host_params, host_batches):
    rules = mesh_lib.axis_rules(base.get_config().mesh)
    model = llama.Llama(cfg)
    train_config = ml_collections.ConfigDict(
        dict(learning_rate=1e-3, lr_schedule="constant", warmup_ratio=0.0, weight_decay=0.1, max_grad_norm=1.0)
    )
    tx = optim.make_optimizer(train_config, 10)
    abstract = state_lib.abstract_train_state(
        lambda r: model.init(r, jnp.zeros((1, 4), jnp.int32))["params"], tx, mesh, rules
    )
    shardings = state_lib.shardings_of(abstract)
    params = jax.tree.map(mesh_lib.put_sharded, host_params, shardings.params)
    state = state_lib.init_train_state(params, tx, jax.random.PRNGKey(0), abstract)
    batches = [
        {k: mesh_lib.put_sharded(v, mesh_lib.batch_sharding(mesh, v.ndim)) for k, v in b.items()} for b in host_batches
    ]
    step = jax.jit(
        loop.make_train_step(sft.make_loss_fn(model), tx, grad_accum_steps=len(batches)),
        in_shardings=(shardings, None),
        out_shardings=(shardings, None),
    )
    with mesh_lib.sharding_context(mesh, rules):
        new_state, metrics = step(state, batches)
    return new_state, jax.device_get(metrics)


def test_fsdp_tensor_step_equals_single_device_step():
    assert jax.device_count() >= 8
    cfg = _tiny_llama()
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(
        lambda r: nn.meta.unbox(llama.Llama(cfg).init(r, jnp.zeros((1, 1), jnp.int32))["params"]), jax.random.PRNGKey(0)
    )  # traced, not compiled
    host_params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.1).astype(np.float32), shapes)
    host_batches = [_batch(rng), _batch(rng)]

    single = mesh_lib.make_mesh(_mesh_config(1, 1, 1), devices=jax.devices()[:1])
    sharded = mesh_lib.make_mesh(_mesh_config(1, 4, 2))
    ref_state, ref_metrics = _one_step(single, cfg, host_params, host_batches)
    new_state, metrics = _one_step(sharded, cfg, host_params, host_batches)

    # parameters really are sharded on the 4x2 mesh
    q_kernel = new_state.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, H, Dh]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q_kernel.addressable_shards[0].data.shape == (2, 8, 2, 8)

    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5, atol=1e-6)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(jax.device_get(new_state.params)),
        jax.tree.leaves(jax.device_get(ref_state.params)),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert int(new_state.step) == 1


def test_indivisible_dims_are_replicated():
    cfg = llama.LlamaConfig(
        vocab_size=65, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )
    mesh = mesh_lib.make_mesh(_mesh_config(1, 4, 2))
    rules = mesh_lib.axis_rules(base.get_config().mesh)
    model = llama.Llama(cfg)
    with mesh_lib.sharding_context(mesh, rules):
        boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["params"], jax.random.PRNGKey(0))
    shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
    # vocab 65 cannot be split over tensor=2: replicated on that dim, still FSDP on embed
    assert shardings["model"]["embed_tokens"]["embedding"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert shardings["lm_head"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
