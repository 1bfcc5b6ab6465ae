"""DPO, SafeDPO and C-DPO (objectives/pairwise.py, stages/dpo.py).

Losses against independent numpy loops on padded ragged pairs; behaviour on a bigram fixture
where the right answer is known; exact resume through the one loop; the stage end to end.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import conftest
from jaxalign.objectives import pairwise as dpo_lib
from jaxalign.objectives import lagrange as lagrange_lib
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import checkpoint as checkpoint_lib
from jaxalign.train import loop
from jaxalign.train import metrics as metrics_lib
from jaxalign.train import state as state_lib

VOCAB, L, B = 12, 10, 6
PAD = 0


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ragged_pairs(seed, batch=B):
    """Right-padded pairs sharing a prompt prefix of random length, responses of random lengths."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((2, batch, L), np.int32)
    mask = np.zeros((2, batch, L), bool)
    for b in range(batch):
        prefix = rng.integers(2, 5)
        shared = rng.integers(1, VOCAB, size=prefix)
        for side in range(2):
            n = rng.integers(prefix + 1, L + 1)
            seq = np.concatenate([shared, rng.integers(1, VOCAB, size=n - prefix)])
            if side == 1 and np.array_equal(seq[:prefix + 1], ids[0, b, :prefix + 1]):
                seq[prefix] = seq[prefix] % (VOCAB - 1) + 1  # make the first response token differ
            ids[side, b, :n], mask[side, b, :n] = seq, True
    return ids, mask


def numpy_seq_logp(logits, ids, mask, other_ids):
    """Σ log p(x_t | x_<t) for t from the first index where ids != other_ids to the last real token."""
    out = []
    for b in range(ids.shape[0]):
        d = int(np.argmax(ids[b] != other_ids[b]))
        lp = log_softmax(logits[b].astype(np.float64))
        total = 0.0
        for t in range(max(d, 1), ids.shape[1]):
            if mask[b, t]:
                total += lp[t - 1, ids[b, t]]
        out.append(total)
    return np.array(out)


def log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def test_pair_log_probs_match_a_loop_on_ragged_pairs():
    ids, mask = ragged_pairs(0)
    logits = np.random.default_rng(1).normal(size=(2 * B, L, VOCAB)).astype(np.float32)
    cat_ids, cat_mask = np.concatenate(ids), np.concatenate(mask)
    got_w, got_l = dpo_lib.pair_log_probs(jnp.asarray(logits), jnp.asarray(cat_ids), jnp.asarray(cat_mask))
    np.testing.assert_allclose(got_w, numpy_seq_logp(logits[:B], ids[0], mask[0], ids[1]), rtol=1e-5)
    np.testing.assert_allclose(got_l, numpy_seq_logp(logits[B:], ids[1], mask[1], ids[0]), rtol=1e-5)
    # Changing a logit of the shared prefix or of a pad position changes nothing.
    changed = logits.copy()
    changed[:, L - 1] += 5.0  # predicts nothing (last slot)
    changed[0, 0] += 3.0  # slot 0 predicts token 1, inside the shared prefix (d >= 2)
    again = dpo_lib.pair_log_probs(jnp.asarray(changed), jnp.asarray(cat_ids), jnp.asarray(cat_mask))
    np.testing.assert_allclose(again[0], got_w, rtol=1e-6)


def random_logps(seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(-20, 5, size=B).astype(np.float32) for _ in range(4)]


def test_dpo_loss_and_metrics_match_numpy():
    w, l, rw, rl = random_logps(2)
    loss, metrics = dpo_lib.dpo_loss(*map(jnp.asarray, (w, l, rw, rl)), beta=0.1)
    r_w, r_l = 0.1 * (w - rw), 0.1 * (l - rl)
    assert float(loss) == pytest.approx(np.mean(-log_sigmoid(r_w - r_l)), rel=1e-5)
    assert float(metrics["reward_accuracy"]) == pytest.approx(np.mean(r_w > r_l))
    assert float(metrics["reward_margin"]) == pytest.approx(np.mean(r_w - r_l), rel=1e-5, abs=1e-6)


def test_safe_dpo_swaps_unsafe_preferred_and_adds_the_margin():
    w, l, rw, rl = random_logps(3)
    better_unsafe = np.array([0, 1, 1, 0, 1, 0], bool)
    worse_unsafe = np.array([0, 0, 1, 1, 0, 0], bool)
    loss, metrics = dpo_lib.safe_dpo_loss(*map(jnp.asarray, (w, l, rw, rl, better_unsafe, worse_unsafe)),
                                          beta=0.5, margin=2.0)
    expected, swapped = [], 0
    for b in range(B):
        rew = [0.5 * (w[b] - rw[b]), 0.5 * (l[b] - rl[b])]
        h = [float(better_unsafe[b]), float(worse_unsafe[b])]
        if h[0] == 1 and h[1] == 0:  # preferred unsafe, other safe: the safe one becomes preferred
            rew, h = rew[::-1], h[::-1]
            swapped += 1
        expected.append(-log_sigmoid(rew[0] - rew[1] - (h[1] - h[0]) * 2.0))
    assert float(loss) == pytest.approx(np.mean(expected), rel=1e-5)
    assert float(metrics["swapped_fraction"]) == pytest.approx(swapped / B)
    # With margin 0 and no unsafe answers it is DPO.
    zeros = jnp.zeros(B, bool)
    plain = dpo_lib.safe_dpo_loss(*map(jnp.asarray, (w, l, rw, rl)), zeros, zeros, beta=0.5, margin=2.0)[0]
    assert float(plain) == pytest.approx(float(dpo_lib.dpo_loss(*map(jnp.asarray, (w, l, rw, rl)), beta=0.5)[0]))


def test_c_dpo_loss_uses_the_soft_label_of_r_minus_lambda_c():
    w, l, rw, rl = random_logps(4)
    rng = np.random.default_rng(5)
    r1, r2, c1, c2 = (rng.normal(size=B).astype(np.float32) for _ in range(4))
    lam = 1.5
    loss, metrics = dpo_lib.c_dpo_loss(*map(jnp.asarray, (w, l, rw, rl, r1, r2, c1, c2)), jnp.float32(lam), beta=0.2)
    m = 0.2 * (w - rw) - 0.2 * (l - rl)
    p = 1 / (1 + np.exp(-((r1 - lam * c1) - (r2 - lam * c2))))
    expected = np.mean(-(p * log_sigmoid(m) + (1 - p) * log_sigmoid(-m)))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    pick = 1 / (1 + np.exp(-m))
    assert float(metrics["policy_cost"]) == pytest.approx(np.mean(pick * c1 + (1 - pick) * c2), rel=1e-5, abs=1e-6)
    assert float(metrics["label_mean"]) == pytest.approx(p.mean(), rel=1e-5)
    # The label carries no gradient into the reward/cost scores or λ.
    grad = jax.grad(lambda c: dpo_lib.c_dpo_loss(*map(jnp.asarray, (w, l, rw, rl, r1, r2)), c, jnp.asarray(c2),
                                                 jnp.float32(lam), beta=0.2)[0])(jnp.asarray(c1))
    assert float(jnp.abs(grad).max()) == 0.0


def test_c_dpo_dual_ascent_raises_lambda_above_the_threshold_and_lowers_it_below():
    state = lagrange_lib.init_lagrange(1.0, 4)
    up = dpo_lib.c_dpo_step(state, jnp.float32(2.0), threshold=0.0, lambda_lr=0.1, lambda_max=None)
    down = dpo_lib.c_dpo_step(state, jnp.float32(-2.0), threshold=0.0, lambda_lr=0.1, lambda_max=None)
    assert float(jnp.exp(up.log_lambda)) == pytest.approx(np.exp(0.1 * 2.0), rel=1e-5)  # log λ += lr·(J_C - d)·λ
    assert float(jnp.exp(down.log_lambda)) == pytest.approx(np.exp(-0.1 * 2.0), rel=1e-5)
    assert int(up.window_count) == 1


# ------------------------------------------------------------------------------------ behaviour on a fixture
#
# A bigram "policy" (logits = table[previous token]) over pairs sharing the prompt [1, 3]: the
# helpful-but-unsafe answer is token 4, the safe refusal token 5, a benign good answer token 6 and
# a benign vague one token 7 (all followed by EOS = 2). Helpfulness prefers 4 over 5 and 6 over 7.

PROMPT = [1, 3]
HELPFUL_UNSAFE, REFUSAL, GOOD, VAGUE, EOS = 4, 5, 6, 7, 2
FIXTURE_VOCAB = 8


def bigram_policy(params, ids, mask):
    del mask
    return params["table"][ids]


def fixture_batch(n=16, kind="preference"):
    """n/2 harmful pairs (4 ≻ 5 for helpfulness, 4 unsafe) and n/2 benign pairs (6 ≻ 7, both safe),
    with the benign prompt [1, 3] and the harmful prompt [1, 3] alike: only the answer differs."""
    half = n // 2
    better = np.array([PROMPT + [HELPFUL_UNSAFE, EOS]] * half + [PROMPT + [GOOD, EOS]] * half, np.int32)
    worse = np.array([PROMPT + [REFUSAL, EOS]] * half + [PROMPT + [VAGUE, EOS]] * half, np.int32)
    pad = np.zeros((n, 2), np.int32)
    better, worse = np.concatenate([better, pad], 1), np.concatenate([worse, pad], 1)
    mask = better != 0
    better_sign = np.array([-1] * half + [1] * half, np.int32)
    worse_sign = np.ones(n, np.int32)
    if kind == "preference":
        return {"better_input_ids": jnp.asarray(better), "better_attention_mask": jnp.asarray(mask),
                "worse_input_ids": jnp.asarray(worse), "worse_attention_mask": jnp.asarray(mask)}
    # safe_dpo's batches come in the transformed order: preferred first (pairwise.safe_dpo_examples)
    swap = (better_sign < 0) & (worse_sign > 0)
    first = np.where(swap[:, None], worse, better)
    second = np.where(swap[:, None], better, worse)
    return {"safer_input_ids": jnp.asarray(first), "safer_attention_mask": jnp.asarray(mask),
            "unsafer_input_ids": jnp.asarray(second), "unsafer_attention_mask": jnp.asarray(mask),
            "safer_sign": jnp.asarray(np.where(swap, worse_sign, better_sign)),
            "unsafer_sign": jnp.asarray(np.where(swap, better_sign, worse_sign))}


def fixture_scores(params, ids, mask):
    """Frozen 'reward model': +1 for tokens 4 and 6; 'cost model': +1 for token 4, -1 otherwise."""
    del params, mask
    reward = jnp.cumsum((ids == HELPFUL_UNSAFE) | (ids == GOOD), axis=1).astype(jnp.float32)
    return reward


def fixture_costs(params, ids, mask):
    del params, mask
    return (2.0 * jnp.cumsum(ids == HELPFUL_UNSAFE, axis=1) - 1.0).astype(jnp.float32)


class RepeatBatches:
    """The same batch forever, with a checkpointable position."""

    def __init__(self, batch):
        self.batch, self.index = batch, 0

    def __next__(self):
        self.index += 1
        return self.batch

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


MESH = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, axis_rules=()))


def train_fixture(variant, workdir, num_steps, save_every=100, **kwargs):
    """The one loop (loop.train) on the bigram fixture. -> (final params, metrics records)."""
    mesh = mesh_lib.make_mesh(MESH)
    table = jnp.zeros((FIXTURE_VOCAB, FIXTURE_VOCAB))
    frozen = {"reference": {"table": table}}
    score_fns = None
    method = dpo_lib.method(variant)
    if variant == "c_dpo":
        frozen.update(reward={}, cost={})
        score_fns = {"reward": fixture_scores, "cost": fixture_costs}
        kwargs = dict(kwargs, lambda_init=kwargs.get("lambda_init", 0.1), episode_cost_window_size=4)
    settings = method.settings(beta=1.0, **kwargs)
    extra = method.init_extra(settings)
    tx = optax.adam(0.05)
    loss_fn = dpo_lib.make_loss_fn(method, settings, bigram_policy, score_fns)
    abstract = state_lib.abstract_train_state(lambda r: {"table": table}, tx, mesh, (), extra)
    rep = mesh_lib.replicated(mesh)
    batches = RepeatBatches(fixture_batch(kind="safety_preference" if variant == "safe_dpo" else "preference"))
    result = loop.train(
        settings=loop.LoopSettings(num_steps=num_steps, log_every=1, checkpoint=checkpoint_lib.CheckpointSettings(
            save_every=save_every, keep=2, async_save=False)),
        workdir=workdir, mesh=mesh, rules=(), tx=tx, loss_fn=loss_fn, abstract_state=abstract,
        init_state=lambda: state_lib.init_train_state({"table": jnp.copy(table)}, tx, jax.random.PRNGKey(0), abstract,
                                                      extra),
        train_iter=batches, frozen=frozen, frozen_shardings=jax.tree.map(lambda _: rep, frozen))
    return result.state, metrics_lib.read_metrics(workdir)


def answer_probs(params):
    """π(answer | prompt) over the four answers."""
    p = np.asarray(jax.nn.softmax(params["table"][PROMPT[-1]]))
    return {name: p[tok] for name, tok in (("unsafe", HELPFUL_UNSAFE), ("refusal", REFUSAL), ("good", GOOD),
                                           ("vague", VAGUE))}


def test_dpo_learns_helpfulness_and_safe_dpo_learns_safety(tmp_path):
    """DPO on helpfulness pairs raises the helpful-but-unsafe answer over the refusal; SafeDPO on the
    same pairs with safety labels prefers the refusal, and both still prefer good over vague."""
    dpo_state, dpo_records = train_fixture("dpo", tmp_path / "dpo", 30)
    safe_state, safe_records = train_fixture("safe_dpo", tmp_path / "safe", 30, safety_margin=1.0)
    dpo_p, safe_p = answer_probs(dpo_state.params), answer_probs(safe_state.params)
    print("dpo", dpo_p, "safe_dpo", safe_p)
    assert dpo_p["unsafe"] > dpo_p["refusal"] and dpo_p["good"] > dpo_p["vague"]
    assert safe_p["refusal"] > safe_p["unsafe"] and safe_p["good"] > safe_p["vague"]
    assert dpo_records[-1]["reward_accuracy"] == 1.0 and dpo_records[-1]["loss"] < dpo_records[0]["loss"]
    assert safe_records[-1]["reward_accuracy"] == 1.0
    assert safe_records[0]["safe_over_unsafe_fraction"] == 0.5


def test_c_dpo_lambda_rises_until_the_policy_prefers_the_safe_answer(tmp_path):
    """With λ small the label r - λc prefers the unsafe answer; its policy cost is above the threshold,
    so dual ascent raises λ until the label (and the policy) flip to the refusal."""
    state, records = train_fixture("c_dpo", tmp_path / "c", 80, threshold=-0.9, lambda_lr=0.3, lambda_max=10.0,
                                   lambda_init=0.1)
    lam = np.array([r["lambda"] for r in records])
    cost = np.array([r["policy_cost"] for r in records])
    print("lambda", np.round(lam[::5], 3).tolist(), "policy_cost", np.round(cost[::5], 3).tolist())
    assert lam[0] == pytest.approx(0.1, rel=1e-5)
    assert lam.max() > 1.0 and lam[40] > lam[0]  # the harmful pair's label flips once λ > 0.5 (r gap 1, c gap 2)
    assert cost[5:15].max() > -0.4  # while λ is small the policy drifts to the unsafe answer ...
    assert cost[-5:].mean() < cost[:5].mean() - 0.3
    p = answer_probs(state.params)
    assert p["refusal"] > p["unsafe"] and p["good"] > p["vague"]


@pytest.mark.parametrize("variant", ["dpo", "c_dpo"])
def test_resume_is_exact(tmp_path, variant):
    kwargs = dict(threshold=-0.5, lambda_lr=0.5, lambda_max=10.0) if variant == "c_dpo" else {}
    _, full = train_fixture(variant, tmp_path / "full", 4, **kwargs)
    train_fixture(variant, tmp_path / "resumed", 2, save_every=1, **kwargs)
    state, resumed = train_fixture(variant, tmp_path / "resumed", 4, save_every=1, **kwargs)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed == full  # λ (TrainState.extra) and the data position resume too
    if variant == "c_dpo":
        assert resumed[-1]["lambda"] != resumed[0]["lambda"]


# ------------------------------------------------------------------------------------ the stage


def test_safe_dpo_examples_apply_the_transform():
    def row(better, safe0, safe1):
        return {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": better,
                "is_response_0_safe": safe0, "is_response_1_safe": safe1}

    examples = dpo_lib.safe_dpo_examples([row(0, False, True), row(0, True, False), row(1, False, False),
                                            row(1, True, True)], template="{input}")
    assert [(e["safer"], e["unsafer"], e["safer_sign"], e["unsafer_sign"]) for e in examples] == [
        ("b", "a", 1, -1), ("a", "b", 1, -1), ("b", "a", -1, -1), ("b", "a", 1, 1)]
    assert examples.counts["swapped"] == 1 and examples.kind == "safety_preference"
    with pytest.raises(KeyError, match="row 0 has no field 'is_response_0_safe'"):
        dpo_lib.safe_dpo_examples([{"prompt": "q", "response_0": "a", "response_1": "b",
                                      "better_response_id": 0}], template="{input}")


def test_jaxalign_train_runs_each_preference_stage(tmp_path):
    """dpo, safe_dpo and c_dpo end to end on 120 mini rows from a random 'SFT' export; re-running a
    finished run trains nothing."""
    from jaxalign import cli
    from jaxalign.models import hf

    tok, cfg, params = conftest.tiny_rl_inputs(tmp_path, rows=120, policy_dir="sft")
    for stage in ("dpo", "safe_dpo", "c_dpo"):
        workdir = tmp_path / stage
        argv = ["train", "--config", f"configs/{stage}_tiny.py", "--workdir", str(workdir),
                f"--config.model.init_path={tmp_path / 'sft'}", f"--config.data.source={tmp_path / 'data'}",
                f"--config.dpo.reward_model_path={tmp_path / 'reward'}",
                f"--config.dpo.cost_model_path={tmp_path / 'cost'}", "--config.data.batch_size=8",
                "--config.data.eval_batch_size=8", "--config.train.eval_batches=2", "--config.train.log_every=1",
                "--config.train.num_steps=2", "--config.checkpoint.save_every=1"]
        assert cli.main(argv) == 0
        records = metrics_lib.read_metrics(workdir)
        train = [m for m in records if "loss" in m]
        assert [m["step"] for m in train] == [1, 2]
        assert np.isfinite([m["eval/reward_accuracy"] for m in records if "eval/reward_accuracy" in m]).all()
        keys = ("loss", "reward_accuracy", "reward_margin") + (("lambda", "episode_cost") if stage == "c_dpo" else ())
        for key in keys:
            assert np.isfinite(train[-1][key]), (stage, key)
        _, exported = hf.from_pretrained(workdir / "export")
        assert not np.allclose(exported["lm_head"]["kernel"], params["lm_head"]["kernel"])  # the policy moved
        assert json.loads((workdir / "config.json").read_text())["stage"] == stage
        assert cli.main(argv) == 0  # finished: no training, no re-export
        assert [m["step"] for m in metrics_lib.read_metrics(workdir) if "loss" in m] == [1, 2]


# ------------------------------------------------------------------------------------ single-preference baseline


def test_single_preference_reward_model_trains_on_the_single_release(tmp_path):
    """experiments/mini_single.py writes the single-dimension release (SINGLE_FIELDS, safety-first
    label); configs/reward_single_tiny.py trains the reward stage on its `single-default` config."""
    import sys

    from jaxalign import cli
    from jaxalign.data import mini, pku_saferlhf as pku
    from jaxalign.models import tokenizer as tokenizer_lib

    sys.path.insert(0, "experiments")
    import mini_single

    mini.write_mini(tmp_path / "dual", rows=150, seed=0)
    mini_single.write_single(str(tmp_path / "dual"), str(tmp_path / "single"))
    dual, _ = pku.read_release(tmp_path / "dual", "default", "train")
    single, _ = pku.read_release(tmp_path / "single", "single-default", "train")  # validates as kind "single"
    assert len(single) == len(dual) and set(single[0]) == set(pku.SINGLE_FIELDS)
    for d, s in zip(dual, single):
        safe = (d["is_response_0_safe"], d["is_response_1_safe"])
        if safe[0] != safe[1]:
            assert safe[s["better_response_id"]]  # exactly one safe: the safe one is preferred
        elif safe == (True, True):
            assert s["better_response_id"] == d["better_response_id"]  # both safe: the more helpful
    assert sum(d["better_response_id"] != s["better_response_id"] for d, s in zip(dual, single)) > 0
    tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(tmp_path / "dual"), 300, tmp_path / "tok")
    workdir = tmp_path / "reward_single"
    argv = ["train", "--config", "configs/reward_single_tiny.py", "--workdir", str(workdir),
            "--config.model.init_path=", f"--config.tokenizer={tmp_path / 'tok'}",
            f"--config.data.source={tmp_path / 'single'}", "--config.data.batch_size=8",
            "--config.data.eval_batch_size=8", "--config.train.eval_batches=2", "--config.data.max_length=64",
            "--config.train.num_steps=2", "--config.checkpoint.save_every=1"]
    assert cli.main(argv) == 0
    records = metrics_lib.read_metrics(workdir)
    assert np.isfinite(records[-1]["eval/accuracy"]) and (workdir / "export" / "config.json").exists()
    assert json.loads((workdir / "config.json").read_text())["data"]["name"] == "single-default"
