"""Reward and cost losses against per-sample numpy references written like upstream's loops."""

import numpy as np
import pytest

import jax.numpy as jnp

from jaxalign.objectives import preference


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _pairs(seed, batch=5, length=12, vocab=7):
    """Right-padded pairs sharing a prompt, of unequal lengths, differing after the prompt."""
    rng = np.random.default_rng(seed)
    ids_a = np.zeros((batch, length), np.int32)
    ids_b = np.zeros((batch, length), np.int32)
    mask_a = np.zeros((batch, length), bool)
    mask_b = np.zeros((batch, length), bool)
    for i in range(batch):
        prompt = rng.integers(1, vocab, size=rng.integers(1, 4))
        len_a, len_b = rng.integers(len(prompt) + 1, length + 1, size=2)
        a = np.concatenate([prompt, rng.integers(1, vocab, size=len_a - len(prompt))])
        b = np.concatenate([prompt, rng.integers(1, vocab, size=len_b - len(prompt))])
        if len_a == len_b and np.array_equal(a, b):
            b[-1] = a[-1] % (vocab - 1) + 1  # any other token id
        ids_a[i, :len_a], mask_a[i, :len_a] = a, True
        ids_b[i, :len_b], mask_b[i, :len_b] = b, True
    assert not any(np.array_equal(ids_a[i], ids_b[i]) for i in range(batch))
    scores_a = rng.normal(size=(batch, length)).astype(np.float32)
    scores_b = rng.normal(size=(batch, length)).astype(np.float32)
    return ids_a, ids_b, mask_a, mask_b, scores_a, scores_b


def _window_ref(ids_a, ids_b, mask_a, mask_b, i):
    end = max(np.nonzero(mask_a[i])[0][-1], np.nonzero(mask_b[i])[0][-1])
    diverge = np.nonzero(ids_a[i] != ids_b[i])[0][0]
    assert 0 <= diverge <= end
    return diverge, end


def _end(scores, mask):
    return np.array([scores[i, np.nonzero(mask[i])[0][-1]] for i in range(len(scores))])


@pytest.mark.parametrize("reg", [0.0, 0.001, 0.5])
def test_reward_sequence_loss(reg):
    rng = np.random.default_rng(0)
    better, worse = rng.normal(size=(2, 9)).astype(np.float32)
    ref = np.mean([-_log_sigmoid(better[i] - worse[i]) for i in range(9)])
    ref += reg * np.mean(np.square(np.stack([worse, better])))
    got = preference.reward_sequence_loss(jnp.asarray(better), jnp.asarray(worse), reg)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_reward_token_loss(reg):
    ids_w, ids_l, mask_w, mask_l, s_w, s_l = _pairs(1)
    losses = []
    for i in range(len(ids_w)):
        d, e = _window_ref(ids_w, ids_l, mask_w, mask_l, i)
        hw, hl = s_w[i, d : e + 1], s_l[i, d : e + 1]
        loss = -_log_sigmoid(hw - hl).mean()
        if reg > 0:
            loss += reg * np.square(np.stack([hl, hw])).mean()
        losses.append(loss)
    window = preference.divergence_window(ids_w, ids_l, mask_w, mask_l)
    got = preference.reward_token_loss(jnp.asarray(s_w), jnp.asarray(s_l), window, reg)
    np.testing.assert_allclose(got, np.mean(losses), rtol=1e-5)


def test_divergence_window_covers_pad_of_shorter_sequence():
    ids_a = np.array([[5, 6, 7, 8, 0, 0]])
    ids_b = np.array([[5, 6, 9, 0, 0, 0]])
    mask_a, mask_b = ids_a != 0, ids_b != 0
    window = np.asarray(preference.divergence_window(ids_a, ids_b, mask_a, mask_b))
    np.testing.assert_array_equal(window, [[False, False, True, True, False, False]])


@pytest.mark.parametrize("reg", [0.0, 0.001])
def test_cost_sequence_loss_with_sign_terms(reg):
    rng = np.random.default_rng(2)
    c_s, c_u = rng.normal(size=(2, 8)).astype(np.float32)
    safer_sign = rng.choice([-1, 1], size=8)
    unsafer_sign = np.where(safer_sign < 0, -1, rng.choice([-1, 1], size=8))
    losses = []
    for i in range(8):
        k_s, k_u = -safer_sign[i], -unsafer_sign[i]
        losses.append(
            -_log_sigmoid(c_u[i] - c_s[i]) - _log_sigmoid(k_s * c_s[i]) - _log_sigmoid(k_u * c_u[i])
        )
    ref = np.mean(losses) + reg * np.mean(np.square(np.stack([c_s, c_u])))
    got = preference.cost_sequence_loss(
        jnp.asarray(c_s), jnp.asarray(c_u), jnp.asarray(safer_sign), jnp.asarray(unsafer_sign), reg
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("reg", [0.0, 0.2])
def test_cost_token_loss(reg):
    ids_s, ids_u, mask_s, mask_u, s_s, s_u = _pairs(3, batch=6)
    safer_sign = np.array([1, 1, -1, 1, -1, 1])
    unsafer_sign = np.array([-1, 1, -1, -1, -1, 1])
    losses = []
    for i in range(len(ids_s)):
        d, e = _window_ref(ids_s, ids_u, mask_s, mask_u, i)
        lo, hi = s_s[i, d : e + 1], s_u[i, d : e + 1]
        loss = (
            -_log_sigmoid(hi - lo).mean()
            - _log_sigmoid(-safer_sign[i] * lo).mean()
            - _log_sigmoid(-unsafer_sign[i] * hi).mean()
        )
        if reg > 0:
            loss += reg * np.square(np.stack([lo, hi])).mean()
        losses.append(loss)
    window = preference.divergence_window(ids_s, ids_u, mask_s, mask_u)
    got = preference.cost_token_loss(
        jnp.asarray(s_s), jnp.asarray(s_u), jnp.asarray(safer_sign), jnp.asarray(unsafer_sign),
        window, reg,
    )
    np.testing.assert_allclose(got, np.mean(losses), rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["sequence-wise", "token-wise"])
def test_reward_loss_dispatch_and_metrics(loss_type):
    ids_w, ids_l, mask_w, mask_l, s_w, s_l = _pairs(4)
    batch = dict(better_input_ids=ids_w, worse_input_ids=ids_l,
                 better_attention_mask=mask_w, worse_attention_mask=mask_l)
    scores = jnp.asarray(np.concatenate([s_w, s_l]))
    end_w, end_l = _end(s_w, mask_w), _end(s_l, mask_l)
    end_scores = jnp.asarray(np.concatenate([end_w, end_l]))
    loss, metrics = preference.reward_loss(scores, end_scores, batch, loss_type, 0.01)
    if loss_type == "sequence-wise":
        expected = preference.reward_sequence_loss(end_w, end_l, 0.01)
    else:
        window = preference.divergence_window(ids_w, ids_l, mask_w, mask_l)
        expected = preference.reward_token_loss(s_w, s_l, window, 0.01)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(end_w > end_l))
    np.testing.assert_allclose(metrics["reward_mean"], np.mean([*end_w, *end_l]), rtol=1e-5)
    np.testing.assert_allclose(metrics["reward_std"], np.std([*end_w, *end_l], ddof=1), rtol=1e-5)


def test_cost_metrics_and_unknown_loss_type():
    c_s = np.array([-1.0, 0.5, -0.2, 2.0], np.float32)
    c_u = np.array([1.0, 0.1, 0.3, 1.0], np.float32)
    safer_sign = np.array([1, 1, 1, -1])
    unsafer_sign = np.array([-1, -1, 1, -1])
    metrics = preference.cost_metrics(c_s, c_u, safer_sign, unsafer_sign)
    assert float(metrics["accuracy"]) == pytest.approx(0.5)  # pairs 0 and 2
    # cost·sign < 0: safer -1·1, 0.5·1 no, -0.2·1, 2·-1; unsafer 1·-1, 0.1·-1, 0.3·1 no, 1·-1
    assert float(metrics["accuracy_sign"]) == pytest.approx(6 / 8)
    batch = dict(safer_sign=safer_sign, unsafer_sign=unsafer_sign)
    with pytest.raises(ValueError, match="loss_type"):
        preference.cost_loss(jnp.zeros((8, 3)), jnp.zeros(8), batch, "pairwise")


def test_token_wise_loss_scores_right_padding_like_upstream():
    """The token-wise window reaches into the shorter side's right-padding; upstream scores those
    pad positions with HF's default position ids arange(L) (upstream never passes position_ids). The
    score stage's loss equals the token-wise loss on the per-token scores of transformers' LlamaModel +
    a linear head (what upstream's LlamaForScore computes), and differs from scoring pads at the last
    real position (what the model's mask-derived positions alone give)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax
    import flax.linen as nn

    from jaxalign.models import hf, llama, score

    tiny = dict(vocab_size=7, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    cfg = llama.LlamaConfig.from_hf_config(tiny, scan_layers=False)
    module = score.ScoreModel(cfg)
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), np.zeros((1, 1), np.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), shapes)
    ids_a, ids_b, mask_a, mask_b, _, _ = _pairs(3)
    batch = {"better_input_ids": ids_a, "worse_input_ids": ids_b, "better_attention_mask": mask_a,
             "worse_attention_mask": mask_b}
    head = score.ScoreHead(score_type="reward")
    loss_fn = preference.make_score_loss_fn(module, head, "preference", "token-wise", 0.01)
    extra = {"normalizer": score.init_normalizer(1)}
    loss, _ = loss_fn(params, batch, None, extra)

    torch_model = transformers.LlamaModel(transformers.LlamaConfig(**tiny)).eval()
    tensors = hf.backbone_to_hf_tensors(cfg, params["model"], prefix="")
    torch_model.load_state_dict({k: torch.tensor(v) for k, v in tensors.items()}, strict=False)
    ids = np.concatenate([ids_a, ids_b])
    mask = np.concatenate([mask_a, mask_b])
    with torch.no_grad():
        hidden = torch_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    kernel, bias = params["score_head"]["kernel"], params["score_head"]["bias"]
    upstream = hidden.last_hidden_state.numpy() @ kernel + bias  # [2B, L, 1]
    better, worse = np.split(upstream[..., 0], 2)
    window = preference.divergence_window(ids_a, ids_b, mask_a, mask_b)
    expected = preference.reward_token_loss(better, worse, window, 0.01)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-4)

    # Pads at the last real position (no position ids): a different loss, so the window does read pads.
    plain = module.apply({"params": params}, ids, attention_mask=mask).scores[..., 0]
    plain_loss = preference.reward_token_loss(*np.split(np.asarray(plain), 2), window, 0.01)
    assert abs(float(plain_loss) - float(expected)) > 1e-3
    np.testing.assert_array_equal(preference.upstream_positions(jnp.asarray(mask_a)),
                                  np.broadcast_to(np.arange(mask_a.shape[1]), mask_a.shape))
