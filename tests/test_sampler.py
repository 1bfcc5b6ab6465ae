"""Sampler: greedy parity with transformers `generate`, filters, EOS handling, log-probs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from jaxalign.generate import sampler
from jaxalign.generate.sampler import SamplingConfig
from jaxalign.models import hf, kv_cache, layouts, llama
from jaxalign.objectives.common import token_log_probs

VOCAB = 53
PAD = 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, cfg, params): the same random tiny Llama on both sides."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,  # O(1) logits: greedy choices are not near-ties
        pad_token_id=PAD,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("sampler") / "model"
    model.save_pretrained(path)
    cfg, params = hf.from_pretrained(path)
    return model, cfg, params


def _left_padded(lengths, width, seed):
    return conftest.left_padded(lengths, width, seed, vocab_size=VOCAB, pad=PAD)


def _hf_greedy(model, ids, mask, n, eos):
    import torch

    out = model.generate(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=0,
        eos_token_id=list(eos) if eos else None,
        pad_token_id=PAD,
    ).numpy()[:, ids.shape[1] :]
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=PAD)


def test_greedy_matches_transformers_single_prompt(models):
    model, cfg, params = models
    ids, mask = _left_padded([6], 6, seed=0)
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.0, pad_token_id=PAD)
    out = sampler.sample(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0), sampling)
    np.testing.assert_array_equal(np.asarray(out.sequences)[:, 6:], _hf_greedy(model, ids, mask, 10, None))
    assert np.asarray(out.response_mask).all()
    np.testing.assert_array_equal(np.asarray(out.sequences)[:, :6], ids)


def test_greedy_left_padded_batch_with_eos_matches_transformers(models):
    model, cfg, params = models
    ids, mask = _left_padded([8, 3, 5], 8, seed=1)
    n = 10
    free = _hf_greedy(model, ids, mask, n, None)
    # EOS = the token row 0 emits at step 3 (first occurrence), plus an id never emitted.
    first = {int(t): i for i, t in reversed(list(enumerate(free[0])))}
    eos_token, stop = next((t, i) for t, i in sorted(first.items(), key=lambda kv: kv[1]) if i >= 2)
    unused = next(t for t in range(3, VOCAB) if t not in free)
    eos = (unused, eos_token)
    expected = _hf_greedy(model, ids, mask, n, eos)

    sampling = SamplingConfig(max_new_tokens=n, temperature=0.0, eos_token_ids=eos, pad_token_id=PAD)
    out = sampler.sample(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0), sampling)
    tokens = np.asarray(out.sequences)[:, 8:]
    np.testing.assert_array_equal(tokens, expected)
    # Row 0 stops at its EOS: mask covers it, everything after is pad.
    response_mask = np.asarray(out.response_mask)
    assert tokens[0, stop] == eos_token and response_mask[0, : stop + 1].all()
    assert not response_mask[0, stop + 1 :].any() and (tokens[0, stop + 1 :] == PAD).all()
    np.testing.assert_array_equal(np.asarray(out.log_probs)[0, stop + 1 :], 0.0)
    # Response mask = up to and including each row's first EOS.
    for row in range(3):
        hits = np.flatnonzero(np.isin(tokens[row], eos))
        length = hits[0] + 1 if len(hits) else n
        np.testing.assert_array_equal(response_mask[row], np.arange(n) < length)
    np.testing.assert_array_equal(np.asarray(out.sequence_mask), np.concatenate([mask, response_mask], 1))


def test_top_k_sampling_inside_jit_and_log_probs(models):
    _, cfg, params = models
    ids, mask = _left_padded([7, 2, 5], 7, seed=2)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=3, pad_token_id=PAD)

    @jax.jit
    def rollout(params, ids, mask, rng):  # the sampler composes inside a larger jit
        return sampler.sample(params, cfg, ids, mask, rng, sampling)

    out = rollout(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(3))
    seq, seq_mask = np.asarray(out.sequences), np.asarray(out.sequence_mask)
    assert np.asarray(out.response_mask).all()  # no EOS configured
    forward = jax.jit(lambda p, s, m: llama.Llama(cfg).apply({"params": p}, s, attention_mask=m).logits)
    logits = forward(params, jnp.asarray(seq), jnp.asarray(seq_mask))
    logits = np.asarray(logits)[:, 6:-1]  # the logits that chose each response token
    response = seq[:, 7:]
    rank = (logits > np.take_along_axis(logits, response[..., None], -1)).sum(-1)
    assert (rank < 3).all()  # every sampled token is in the top 3
    # log_probs are the raw (temperature 1, unfiltered) model log-probs of the sampled tokens.
    expected = token_log_probs(jnp.asarray(logits), jnp.asarray(response))
    np.testing.assert_allclose(np.asarray(out.log_probs), np.asarray(expected), atol=1e-4)
    # Different keys give different samples.
    other = rollout(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(4))
    assert (np.asarray(other.sequences) != seq).any()


def test_lower_precision_decode_weights_stay_close_to_the_fp32_forward(models):
    """bf16 / int8 decode weights: greedy decoding stays sane (same first token, most tokens
    equal to fp32 greedy) and the sampler's log-probs stay within a bound of the fp32 trainer
    forward's (the RL ratio compares the two); fp32 decode is exact."""
    _, cfg, params = models
    ids, mask = _left_padded([8, 3, 5], 8, seed=1)
    n = 10
    forward = jax.jit(lambda p, s, m: llama.Llama(cfg).apply({"params": p}, s, attention_mask=m).logits)
    greedy = SamplingConfig(max_new_tokens=n, temperature=0.0, pad_token_id=PAD)
    reference = None
    for weights, bound in [("float32", 1e-4), ("bfloat16", 0.1), ("int8", 0.2), ("int8_weight_only", 0.2)]:
        config = dataclasses.replace(greedy, weights=weights)
        out = sampler.sample(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0), config)
        tokens = np.asarray(out.sequences)[:, 8:]
        logits = forward(params, out.sequences, out.sequence_mask)[:, 7:-1]
        gap = np.abs(np.asarray(token_log_probs(logits, out.sequences[:, 8:]) - out.log_probs)).max()
        assert gap < bound, (weights, gap)
        if reference is None:
            reference = tokens
        else:
            np.testing.assert_array_equal(tokens[:, 0], reference[:, 0])
            assert (tokens == reference).mean() >= 0.8, weights


def _draws(logits, sampling, n=4000):
    """n draws of the sampler's next token from one row of logits (each row its own uniform)."""
    rows = jnp.tile(jnp.asarray(logits, jnp.float32)[None], (n, 1))
    return np.asarray(sampler.sample_token(rows, jax.random.PRNGKey(0), sampling))


def test_inverse_cdf_draws_follow_the_softmax_and_never_pick_zero_probability_tokens():
    """One uniform per row, inverse CDF over blocks of the vocab: token frequencies match the
    softmax (chi-square), tokens of probability 0 (filtered, -inf) are never drawn, not even at
    u = 0 or at the largest u below 1, and the log-probs are the raw log-softmax."""
    from scipy import stats

    vocab, n = 300, 20000  # 3 blocks, the last one partial
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (vocab,))) * 2.0
    zero = np.r_[0:5, 126:131, 250:vocab]  # a block's start and end, and the vocab's tail
    logits[zero] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    config = SamplingConfig(max_new_tokens=1)
    rows = jnp.tile(jnp.asarray(logits, jnp.float32)[None], (n, 1))
    tokens, log_probs = sampler.sample_with_log_probs(rows, jax.random.uniform(jax.random.PRNGKey(6), (n,)), config)
    tokens = np.asarray(tokens)
    assert not np.isin(tokens, zero).any()
    np.testing.assert_allclose(np.asarray(log_probs), np.log(probs[tokens]), rtol=1e-5, atol=1e-5)
    likely = probs * n >= 5  # the chi-square cells; the rest are pooled into one
    observed = np.bincount(tokens, minlength=vocab)
    observed = np.r_[observed[likely], observed[~likely].sum()]
    expected = np.r_[probs[likely], probs[~likely].sum()] * n
    statistic = ((observed - expected) ** 2 / expected).sum()
    assert statistic < stats.chi2.ppf(0.999, len(observed) - 1), statistic
    edges = jnp.asarray([0.0, np.nextafter(np.float32(1), np.float32(0))], jnp.float32)
    first, last = np.asarray(sampler.sample_with_log_probs(rows[:2], edges, config)[0])
    positive = np.flatnonzero(probs > 0)
    assert (first, last) == (positive[0], positive[-1])


@pytest.mark.parametrize(
    "top_k, top_p, allowed",
    [
        (2, 1.0, {0, 1}),
        (0, 0.7, {0, 1}),  # 0.4 + 0.3 reaches 0.7
        (0, 0.75, {0, 1, 2}),
        (0, 0.3, {0}),  # the top token is always kept
        (3, 0.5, {0, 1}),  # top-k first, then top-p on the renormalised rest
    ],
)
def test_filters_never_emit_outside_allowed_set(top_k, top_p, allowed):
    probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = np.log(probs)[[3, 0, 4, 1, 2]]  # shuffled: token 1 is the most likely
    order = {0: 1, 1: 3, 2: 4, 3: 0, 4: 2}  # rank -> token id
    allowed_ids = {order[r] for r in allowed}
    sampling = SamplingConfig(max_new_tokens=1, top_k=top_k, top_p=top_p)
    seen = set(_draws(logits, sampling).ravel().tolist())
    assert seen == allowed_ids


def test_decode_segments_sample_the_same_tokens_and_log_probs(models):
    """The decode loop in segments (each over a cache only as long as it has filled) samples exactly
    what one loop over the whole cache does: left padding, an EOS mid-run, temperature sampling."""
    _, cfg, params = models
    ids, mask = _left_padded([7, 2, 5], 7, seed=4)
    n = 40
    base = SamplingConfig(max_new_tokens=n, temperature=1.0, pad_token_id=PAD, cache_segments=1)
    one = sampler.sample(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(7), base)
    row0 = np.asarray(one.sequences)[0, 7:]
    eos = int(row0[12])  # a token row 0 emits mid-run: its first occurrence ends row 0 early
    stop = int(np.flatnonzero(row0 == eos)[0])
    outs = {}
    for segments in (1, 3, 0, 50):  # 0 = auto (2 for 40 new tokens); 50 = one step per segment
        sampling = dataclasses.replace(base, cache_segments=segments, eos_token_ids=(eos,))
        outs[segments] = sampler.sample(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(7),
                                        sampling)
    assert not np.asarray(outs[1].response_mask)[0, stop + 1:].any()
    for segments, out in outs.items():
        np.testing.assert_array_equal(np.asarray(out.sequences), np.asarray(outs[1].sequences), err_msg=str(segments))
        np.testing.assert_array_equal(np.asarray(out.response_mask), np.asarray(outs[1].response_mask))
        # the softmax sums over fewer masked slots: the same numbers to fp32 rounding
        np.testing.assert_allclose(np.asarray(out.log_probs), np.asarray(outs[1].log_probs), rtol=1e-5, atol=1e-5)
    assert sampler.decode_segments(128, 0) == [33, 65, 97, 128]  # auto: one per 32 steps, at most 4
    assert sampler.decode_segments(32, 0) == [32] and sampler.decode_segments(1, 0) == []
    assert sampler.decode_segments(4, 10) == [2, 3, 4]  # never more segments than steps
    cache = kv_cache.init_cache(cfg, 2, 5)
    grown = kv_cache.grow_cache(cache, 9)
    assert grown.mask.shape == (2, 9) and grown.k[0].shape[-1] == 9 and grown.v[0].shape[-2] == 9  # per-layer (unrolled) or stacked
    with pytest.raises(ValueError, match="already has 9 slots"):
        kv_cache.grow_cache(grown, 5)
    with pytest.raises(ValueError, match="cache_segments"):
        SamplingConfig(max_new_tokens=4, cache_segments=-1)


def test_stream_hands_out_the_tokens_sample_draws(models):
    """sampler.stream in runs of 3 tokens: the same tokens and masks as `sample` (one cache segment)
    for the same rng at temperature 1, rows stopping at their EOS; a caller that stops asking stops
    the decode."""
    _, cfg, params = models
    ids, mask = _left_padded([8, 3, 5], 8, seed=4)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, eos_token_ids=(5, 9, 17), pad_token_id=PAD,
                              cache_segments=1)
    out = sampler.sample(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(7), sampling)
    runs = list(sampler.stream(params, cfg, ids, mask, jax.random.PRNGKey(7), sampling, chunk=3))
    tokens, emitted = (np.concatenate(parts, axis=1) for parts in zip(*runs))
    assert [run[0].shape[1] for run in runs][:2] == [1, 3]  # token 0 from the prefill, then runs of 3
    expected_mask = np.asarray(out.response_mask)
    assert (~expected_mask).any()  # a row stopped at an EOS id
    np.testing.assert_array_equal(emitted, expected_mask[:, : emitted.shape[1]])
    assert not expected_mask[:, emitted.shape[1]:].any()  # the stream ended when every row had stopped
    np.testing.assert_array_equal(np.where(emitted, tokens, PAD), np.asarray(out.sequences)[:, 8:8 + tokens.shape[1]])
    first_two = list(zip(range(2), sampler.stream(params, cfg, ids, mask, jax.random.PRNGKey(7), sampling)))
    assert [run[0].shape[1] for _, run in first_two] == [1, 1]


@pytest.mark.parametrize("field, value", [("temperature", float("nan")), ("temperature", float("inf")),
                                          ("temperature", -1.0), ("top_p", float("nan")), ("top_p", float("inf"))])
def test_non_finite_sampling_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} must be .*got {value}"):
        SamplingConfig(max_new_tokens=4, **{field: value})


def test_greedy_and_config_validation():
    logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    greedy = SamplingConfig(max_new_tokens=1, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(sampler.sample_token(logits, jax.random.PRNGKey(0), greedy)), [1, 0])
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(max_new_tokens=1, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    assert SamplingConfig(max_new_tokens=1, eos_token_ids=7).eos_token_ids == (7,)


def test_init_model_and_sample_commands(tmp_path, capsys):
    tokenizer_lib = pytest.importorskip("jaxalign.models.tokenizer")
    from jaxalign import cli

    texts = ["How do I bake bread?", "Knead the dough, then let it rise.", "Is it safe?"] * 20
    tokenizer_lib.train_bpe_tokenizer(texts, 300, tmp_path / "tok")
    config = '{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}'
    assert cli.main(["init-model", "--out", str(tmp_path / "m"), "--config-json", config,
                     "--tokenizer", str(tmp_path / "tok")]) == 0
    cfg, params = hf.from_pretrained(tmp_path / "m")
    tokenizer = tokenizer_lib.load_tokenizer(tmp_path / "m")
    assert cfg.vocab_size == len(tokenizer) and cfg.pad_token_id == tokenizer.pad_token_id
    capsys.readouterr()
    assert cli.main(["sample", "--model", str(tmp_path / "m"), "--prompt", "How do I bake bread?",
                     "--max-new-tokens", "5", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    # Greedy decoding of the same prompt through the sampler alone gives the printed text.
    from jaxalign.data.views import format_prompt

    ids = np.asarray([tokenizer(format_prompt("How do I bake bread?"))["input_ids"]], np.int32)
    sampling = SamplingConfig(max_new_tokens=5, temperature=0.0, eos_token_ids=cfg.eos_token_ids,
                              pad_token_id=tokenizer.pad_token_id)
    out = sampler.sample(params, cfg, jnp.asarray(ids), jnp.ones(ids.shape, bool), jax.random.PRNGKey(0), sampling)
    response = np.asarray(out.sequences)[0, ids.shape[1]:][np.asarray(out.response_mask)[0]]
    assert printed.endswith(tokenizer.decode(response.tolist(), skip_special_tokens=True) + "\n")


def test_sharded_decode_keeps_layers_scanned_and_matches_one_device(models):
    """On a mesh of 8 devices (fsdp 4 x tensor 2) the decode layout keeps the layers scanned (an
    unrolled layer stack inside the decode loop made XLA gather every layer's weights onto every
    device: 3.3 -> 50 GiB per device for the 7B rollout) and samples what one device samples
    unrolled, in fp32, bf16 and with int8 kernels quantised per layer; its stacked cache also grows
    across decode segments."""
    from jaxalign.models import loading
    from jaxalign.parallel import mesh as mesh_lib

    _, cfg, params = models
    assert cfg.scan_layers
    mesh = mesh_lib.make_mesh(mesh_lib.MeshSettings(data=1, fsdp=4, tensor=2))
    rules = mesh_lib.axis_rules(mesh_lib.MeshSettings())
    shardings = loading.param_shardings(llama.Llama(cfg), mesh, rules)
    sharded = loading.place(jax.device_get(params), shardings)
    ids, mask = _left_padded([8, 3, 5, 6], 8, seed=2)
    # float32 twice: also in 3 segments, each growing the stacked (scanned) cache
    for weights, segments in (("float32", 0), ("float32", 3), ("bfloat16", 0), ("int8", 0)):
        config = SamplingConfig(max_new_tokens=6, temperature=0.0, pad_token_id=PAD, weights=weights,
                                cache_segments=segments)
        alone = sampler.sample(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0), config)
        with mesh_lib.sharding_context(mesh, rules):
            assert layouts.decode_params(cfg, sharded, weights)[0].scan_layers  # not unrolled
            batch = mesh_lib.batch_sharding(mesh, 2)
            out = sampler.sample(sharded, cfg, mesh_lib.put_sharded(ids, batch), mesh_lib.put_sharded(mask, batch),
                                 jax.random.PRNGKey(0), config)
        np.testing.assert_array_equal(np.asarray(out.sequences), np.asarray(alone.sequences), err_msg=weights)
        if weights != "int8":  # int8 activations: the scanned and unrolled log-probs differ by up to ~0.1
            np.testing.assert_allclose(np.asarray(out.log_probs), np.asarray(alone.log_probs), atol=1e-4,
                                       err_msg=weights)
