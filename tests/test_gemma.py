"""Gemma 2 and Gemma 3 (text) through the family seam: logits parity with transformers (sliding-window
layers among global ones, softcaps, Gemma 3's local RoPE base and q/k norms), HF round trips, KV-cache
decoding past the window, greedy sampling, a score model and the PPO-Lagrangian stage."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from jaxalign import cli, models
from jaxalign.models import families, gemma, hf, layouts, quantize, score

TINY = dict(
    vocab_size=89,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    head_dim=16,  # != hidden_size / heads
    query_pre_attn_scalar=24,  # != head_dim
    sliding_window=3,  # the sequences below are 4-5 windows long
    max_position_embeddings=128,
    initializer_range=0.3,  # O(1) activations and logits: a 1e-4 tolerance is a real check
    pad_token_id=0,
)
# Gemma 2: alternating sliding / global layers, both softcaps small enough to bind.
GEMMA2 = dict(TINY, num_hidden_layers=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
# Gemma 3: 7 layers = 5 sliding, 1 global, 1 sliding (the 5:1 pattern); the global layers' RoPE linearly
# scaled, the sliding ones' on their own base; biases on q/k/v/o.
GEMMA3 = dict(TINY, num_hidden_layers=7, attention_bias=True, rope_parameters={
    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
CONFIGS = {"gemma2": gemma.Gemma2Config, "gemma3_text": gemma.Gemma3Config}
PAD = 0
_padded = functools.partial(conftest.left_padded, vocab_size=TINY["vocab_size"], pad=PAD)
REPO = pathlib.Path(__file__).resolve().parents[1]


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, ids, mask=None):
    return models.causal_lm(cfg).apply({"params": params}, ids, attention_mask=mask)


def _hf_model(model_type, state=None, **overrides):
    """A random transformers Gemma2ForCausalLM / Gemma3ForCausalLM with non-trivial norms and biases
    (or with the weights `state`)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if model_type == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**{**GEMMA2, **overrides}))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**{**GEMMA3, **overrides}))
    if state is not None:
        model.load_state_dict(state)
        return model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


# transformers' model with one Gemma feature off gives other logits on these inputs, so matching the
# model with the feature on checks that feature.
ABLATIONS = {
    "gemma2": [dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None),
               dict(layer_types=["full_attention"] * 3), dict(query_pre_attn_scalar=16)],
    "gemma3_text": [dict(layer_types=["full_attention"] * 7), dict(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": GEMMA3["rope_parameters"][
            "sliding_attention"]}), dict(rope_parameters={"full_attention": GEMMA3["rope_parameters"]["full_attention"],
                                                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}})],
}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_logits_and_gradients_match_transformers_with_left_padding(tmp_path, model_type):
    import torch

    model = _hf_model(model_type)
    model.save_pretrained(tmp_path)
    cfg, params = hf.from_pretrained(tmp_path, dtype="float32")
    assert type(cfg) is CONFIGS[model_type] and cfg.tie_word_embeddings and "lm_head" not in params
    assert list(cfg.layer_types) == model.config.layer_types
    ids, mask = _padded([14, 9, 3], 14, seed=1)
    weights = np.random.RandomState(2).randn(*ids.shape, cfg.vocab_size).astype(np.float32) * mask[..., None]

    def loss(p):  # a random linear function of the real positions' logits
        logits = models.causal_lm(cfg).apply({"params": p}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
        return jnp.sum(logits * weights), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)), position_ids=torch.tensor(positions)).logits
    np.testing.assert_allclose(np.asarray(logits)[mask], ref.detach().numpy()[mask], atol=1e-4, rtol=0)
    # The gradient of every parameter (the custom-VJP attention through windows and softcaps, the tied
    # embedding's two uses), mapped to HF names by the family's tensor map, equals torch autograd's.
    (ref * torch.tensor(weights)).sum().backward()
    ours = hf.params_to_hf_tensors(cfg, jax.device_get(grads))
    for name, p in model.named_parameters():
        np.testing.assert_allclose(ours[name], p.grad.numpy(), atol=2e-4, rtol=1e-3, err_msg=name)
    for change in ABLATIONS[model_type]:
        ablated = conftest.hf_logits(_hf_model(model_type, model.state_dict(), **change), ids, mask)
        assert np.abs(ablated[mask] - ref.detach().numpy()[mask]).max() > 1e-2, change


@functools.lru_cache
def _tiny(model_type):
    """(cfg, params) of a jaxalign-side tiny Gemma 2 (untied, with biases) / Gemma 3 (tied; 3 layers: a
    global one between two sliding ones)."""
    if model_type == "gemma2":
        cfg = gemma.Gemma2Config(**{**GEMMA2, "tie_word_embeddings": False, "attention_bias": True}, eos_token_id=[1, 5])
    else:
        keys = {k: v for k, v in GEMMA3.items() if k not in ("rope_parameters", "num_hidden_layers")}
        cfg = gemma.Gemma3Config(**keys, num_hidden_layers=3, layer_types=("sliding_attention", "full_attention",
                                 "sliding_attention"), rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
    return cfg, conftest.random_params(cfg)


@pytest.fixture(params=sorted(CONFIGS))
def tiny(request):
    return _tiny(request.param)


def test_save_pretrained_loads_in_transformers_and_back(tiny, tmp_path):
    pytest.importorskip("transformers")
    cfg, params = tiny
    logits = lambda c, p, ids, mask: _forward(c, p, jnp.asarray(ids), jnp.asarray(mask)).logits  # noqa: E731
    model, _, cfg2 = conftest.transformers_round_trip(tmp_path, cfg, params, logits)
    assert model.config.layer_types == list(cfg.layer_types) and model.config.sliding_window == 3
    assert cfg2 == cfg


def test_kv_cache_decode_matches_full_forward_past_the_window():
    cfg, params = _tiny("gemma3_text")  # both families decode in test_greedy_sampling_matches_transformers_generate
    prompt, prompt_mask = _padded([7, 4], 7, seed=6)
    steps = np.random.RandomState(6).randint(3, cfg.vocab_size, (2, 6))
    full_ids = np.concatenate([prompt, steps], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones((2, 6), bool)], axis=1)
    full = np.asarray(_forward(cfg, params, jnp.asarray(full_ids), jnp.asarray(full_mask)).logits)
    # The training layout (scanned: per-layer kinds traced) and the sampler's (unrolled, fused q/k/v, gate/up).
    for c, p in ((cfg, params), layouts.decode_params(cfg, params)):
        apply = jax.jit(models.causal_lm(c).apply)
        out = apply({"params": p}, jnp.asarray(prompt), jnp.asarray(prompt_mask), None, models.init_cache(c, 2, 13))
        np.testing.assert_allclose(np.asarray(out.logits)[prompt_mask], full[:, :7][prompt_mask], atol=1e-5)
        for i in range(6):
            out = apply({"params": p}, jnp.asarray(steps[:, i:i + 1]), None, None, out.cache)
            np.testing.assert_allclose(np.asarray(out.logits[:, 0]), full[:, 7 + i], atol=1e-5)
    # The decode layout quantises the family's projection kernels (families.LayerWeights.kernels).
    _, int8 = layouts.decode_params(cfg, params, "int8")
    layer = int8["model"]["layers_0"]
    assert quantize.is_quantized(layer["self_attn"]["qkv_proj"]["kernel"]) and quantize.is_quantized(layer["mlp"]["down_proj"]["kernel"])
    assert not quantize.is_quantized(layer["pre_feedforward_layernorm"]["scale"])


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_greedy_sampling_matches_transformers_generate(model_type):
    ids, mask = _padded([8, 3, 6], 8, seed=3)
    # A random tied Gemma 3 repeats each row's last token (its sqrt(D)-scaled embedding dominates the
    # residual and meets itself in the tied head); an untied head gives varied tokens to compare.
    untied = {"tie_word_embeddings": False} if model_type == "gemma3_text" else {}
    conftest.greedy_matches_transformers(_hf_model(model_type, **untied), ids, mask, n=8, pad=PAD)


def test_config_round_trip_legacy_keys_and_errors():
    transformers = pytest.importorskip("transformers")
    for config_class, keys in ((gemma.Gemma2Config, GEMMA2), (gemma.Gemma3Config, GEMMA3)):
        cfg = config_class.from_hf_config(dict(keys, num_hidden_layers=7, eos_token_id=[1, 106]))
        assert families.config_from_hf(cfg.to_hf_config()) == cfg and families.of(cfg).model_type == cfg.model_type
        hash(cfg)
        # transformers' strict config class takes what we write, defaults included (ints stay ints).
        default = config_class(**{k: v for k, v in TINY.items() if k not in ("query_pre_attn_scalar",)}, num_hidden_layers=2,
                               final_logit_softcapping=30)
        reference = transformers.AutoConfig.for_model(**default.to_hf_config())
        assert (reference.query_pre_attn_scalar, reference.final_logit_softcapping) == (256, 30.0)
    # A transformers-4 Gemma 3 config.json (google/gemma-3-1b-it's keys): no layer_types, legacy RoPE keys.
    legacy = dict(TINY, model_type="gemma3_text", num_hidden_layers=8, rope_theta=1e6, rope_local_base_freq=1e4,
                  rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=4,
                  attn_logit_softcapping=None)
    cfg = families.config_from_hf(legacy)
    reference = transformers.Gemma3TextConfig(**{k: v for k, v in legacy.items() if k != "model_type"})
    assert list(cfg.layer_types) == reference.layer_types and cfg.layer_types[3] == "full_attention"
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.rope_scaling.factor) == (1e6, 1e4, 8.0)
    assert cfg.attention_kinds[cfg.layer_kinds[0]].window == 3 and cfg.attention_kinds[cfg.layer_kinds[3]].window is None
    for change, words in [
        (dict(model_type="gemma3_text", attn_logit_softcapping=50.0), ["attn_logit_softcapping", "ignores"]),
        (dict(model_type="gemma2", use_bidirectional_attention=True), ["use_bidirectional_attention"]),
        (dict(model_type="gemma2", hidden_activation="relu"), ["hidden_activation='relu'"]),
        (dict(model_type="gemma2", layer_types=["full_attention", "chunked"]), ["layer_types"]),
        (dict(model_type="gemma2", sliding_window=None), ["sliding_window=None"]),
    ]:
        with pytest.raises(ValueError) as info:
            families.config_from_hf({**TINY, "num_hidden_layers": 2, **change})
        assert all(word in str(info.value) for word in words), (change, str(info.value))


def test_score_model_and_ppo_lagrangian_stage_on_a_gemma_backbone(mini_data, tmp_path):
    """Reward and cost models on a random Gemma 2 backbone (saved, reloaded), then `jaxalign train`
    PPO-Lagrangian (configs/ppo_lag_tiny.py) with a random Gemma 2 actor: rollouts 4-6 windows long."""
    from jaxalign.models import tokenizer as tokenizer_lib
    from jaxalign.train import metrics as metrics_lib

    tok = tokenizer_lib.load_tokenizer(mini_data / "tokenizer")
    shape = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                 max_position_embeddings=128)
    cfg = gemma.Gemma2Config(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    backbone = conftest.random_params(cfg)["model"]
    ids, mask = _padded([6, 4], 6, seed=4)
    scores = jax.jit(lambda p: score.ScoreModel(cfg).apply({"params": p}, ids, attention_mask=mask))
    for seed, kind in enumerate(("reward", "cost")):
        head = score.ScoreHead(score_type=kind)
        params = score.init_params_from_backbone(backbone, cfg, jax.random.PRNGKey(seed))
        score.save_score_model(tmp_path / kind, cfg, params, head)
        assert hf.read_config(tmp_path / kind)["architectures"] == ["Gemma2ForScore"]
        cfg2, head2, params2, _ = score.load_score_model(tmp_path / kind)
        assert cfg2 == cfg and head2 == head
        before, after = scores(params), scores(params2)
        np.testing.assert_allclose(after.end_scores, before.end_scores, atol=1e-6)
    # The score model's backbone is the causal LM's: its hidden states are the LM's.
    lm_hidden = _forward(cfg, {"model": backbone}, jnp.asarray(ids), jnp.asarray(mask)).hidden_states
    np.testing.assert_allclose(np.asarray(before.hidden_states)[mask], np.asarray(lm_hidden)[mask], atol=1e-5)

    params = conftest.random_params(cfg, seed=3)  # the actor (and reference): a random Gemma 2 export
    hf.save_pretrained(tmp_path / "policy", cfg, params)
    tok.save_pretrained(str(tmp_path / "policy"))
    argv = ["train", "--config", str(REPO / "configs" / "ppo_lag_tiny.py"), "--workdir", str(tmp_path / "rl"),
            f"--config.model.init_path={tmp_path / 'policy'}", f"--config.rl.reward_model_path={tmp_path / 'reward'}",
            f"--config.rl.cost_model_path={tmp_path / 'cost'}", f"--config.data.source={mini_data / 'data'}",
            "--config.data.max_length=64", "--config.data.eval_split=", "--config.checkpoint.save_every=0",
            "--config.rl.prompt_length=40", "--config.rl.max_new_tokens=8", "--config.data.batch_size=8",
            "--config.train.num_steps=2"]
    assert cli.main(argv) == 0
    records = metrics_lib.read_metrics(tmp_path / "rl")
    assert [r["step"] for r in records] == [1, 2]
    for key in ("reward", "cost", "lambda", "episode_cost", "reward_critic_loss", "cost_critic_loss", "ptx_loss"):
        assert np.isfinite(records[-1][key]), key
    exported = hf.read_config(tmp_path / "rl" / "export")
    assert exported["model_type"] == "gemma2" and exported["architectures"] == ["Gemma2ForCausalLM"]
    assert exported["layer_types"] == ["sliding_attention", "full_attention"] and exported["sliding_window"] == 4

