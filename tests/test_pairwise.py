"""The pairwise table (objectives/pairwise.py): IPO, SimPO and KTO through the table's builder against
independent numpy losses computed from the logits token by token; what each learns on a bigram
fixture; the table's shape; `jaxalign train` of each new method on mini data with an export that loads.
(DPO, SafeDPO and C-DPO: tests/test_dpo.py.)"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conftest
from jaxalign.data import views
from jaxalign.objectives import pairwise
from jaxalign.train import metrics as metrics_lib

VOCAB, L, B = 12, 12, 6


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def table_policy(params, ids, mask):
    """A bigram 'policy': the logits of token t+1 are table[token t]."""
    del mask
    return params["table"][ids]


def tables(seed):
    rng = np.random.default_rng(seed)
    return {"table": rng.normal(size=(VOCAB, VOCAB)).astype(np.float32)}


def numpy_logp(table, seq, positions):
    """Σ_{t in positions} log p(seq[t] | seq[t-1]) of the bigram table, in float64."""
    lp = log_softmax(table.astype(np.float64))
    return sum(lp[seq[t - 1], seq[t]] for t in positions)


def ragged_pairs(seed):
    """Right-padded pairs sharing a prompt; responses of random lengths, some sharing a first token.
    -> (per example: prompt, [response_a, response_b]), batch dict with response masks."""
    rng = np.random.default_rng(seed)
    examples, batch = [], {}
    for side in ("better", "worse"):
        batch[f"{side}_input_ids"] = np.zeros((B, L), np.int32)
        batch[f"{side}_attention_mask"] = np.zeros((B, L), bool)
        batch[f"{side}_response_mask"] = np.zeros((B, L), bool)
    for b in range(B):
        prompt = list(rng.integers(1, VOCAB, size=rng.integers(2, 5)))
        responses = [list(rng.integers(1, VOCAB, size=rng.integers(1, L - len(prompt) + 1))) for _ in range(2)]
        if b % 2:  # a shared first response token: the divergence window and the response window differ
            responses[1][0] = responses[0][0]
            if responses[0] == responses[1]:
                responses[1][-1] = responses[1][-1] % (VOCAB - 1) + 1
        for side, response in zip(("better", "worse"), responses):
            seq = prompt + response
            batch[f"{side}_input_ids"][b, : len(seq)] = seq
            batch[f"{side}_attention_mask"][b, : len(seq)] = True
            batch[f"{side}_response_mask"][b, len(prompt): len(seq)] = True
        examples.append((prompt, responses))
    return examples, {k: jnp.asarray(v) for k, v in batch.items()}


def divergence_logps(table, examples):
    """ℓ of both sides over safe-rlhf's DPO window (the first differing token on), per pair."""
    out = []
    for prompt, (a, b) in examples:
        sa, sb = prompt + a, prompt + b
        d = next(i for i in range(max(len(sa), len(sb))) if i >= min(len(sa), len(sb)) or sa[i] != sb[i])
        out.append([numpy_logp(table, s, range(max(d, 1), len(s))) for s in (sa, sb)])
    return np.array(out)  # [B, 2]


def response_logps(table, examples):
    """(ℓ of each response's tokens [B, 2], their lengths [B, 2])."""
    lp = [[numpy_logp(table, prompt + r, range(len(prompt), len(prompt) + len(r))) for r in rs]
          for prompt, rs in examples]
    return np.array(lp), np.array([[len(r) for r in rs] for _, rs in examples])


def metrics_of(name, settings, batch, policy_params, frozen):
    entry = pairwise.method(name)
    fn = pairwise.make_metrics_fn(entry, settings, table_policy)
    loss, metrics = jax.jit(fn)(policy_params, batch, entry.init_extra(settings), frozen)
    return float(loss), {k: float(v) for k, v in metrics.items()}


def test_ipo_through_the_table_matches_numpy():
    examples, batch = ragged_pairs(0)
    policy, reference = tables(1), tables(2)
    loss, metrics = metrics_of("ipo", pairwise.IPOSettings(tau=0.25), batch, policy, {"reference": reference})
    ratio = divergence_logps(policy["table"], examples) - divergence_logps(reference["table"], examples)
    h = ratio[:, 0] - ratio[:, 1]
    assert loss == pytest.approx(np.mean((h - 1 / (2 * 0.25)) ** 2), rel=1e-5)
    assert metrics["reward_margin"] == pytest.approx(h.mean(), rel=1e-4, abs=1e-5)
    assert metrics["reward_accuracy"] == pytest.approx(np.mean(h > 0))
    # The same pairs under DPO give DPO's loss of the same h (the two methods read the same inputs).
    dpo_loss, _ = metrics_of("dpo", pairwise.DPOSettings(beta=0.3), batch, policy, {"reference": reference})
    assert dpo_loss == pytest.approx(np.mean(-log_sigmoid(0.3 * h)), rel=1e-5)


def test_simpo_through_the_table_matches_numpy_without_a_reference():
    examples, batch = ragged_pairs(3)
    policy = tables(4)
    loss, metrics = metrics_of("simpo", pairwise.SimPOSettings(beta=2.5, gamma=0.7), batch, policy, {})
    lp, n = response_logps(policy["table"], examples)
    reward = 2.5 * lp / n
    assert loss == pytest.approx(np.mean(-log_sigmoid(reward[:, 0] - reward[:, 1] - 0.7)), rel=1e-5)
    assert metrics["better_reward"] == pytest.approx(reward[:, 0].mean(), rel=1e-5)
    assert metrics["reward_accuracy"] == pytest.approx(np.mean(reward[:, 0] > reward[:, 1]))
    assert pairwise.method("simpo").scorers == ()  # no frozen model is loaded for it


def qa_batch(seed, rows=B):
    """Right-padded single answers (the qa kind) with their prompts and safety labels."""
    rng = np.random.default_rng(seed)
    ids, mask, response = (np.zeros((rows, L), np.int32), np.zeros((rows, L), bool), np.zeros((rows, L), bool))
    prompts, answers = [], []
    for b in range(rows):
        prompt = list(rng.integers(1, VOCAB, size=rng.integers(2, 6)))
        answer = list(rng.integers(1, VOCAB, size=rng.integers(1, L - len(prompt) + 1)))
        ids[b, : len(prompt) + len(answer)] = prompt + answer
        mask[b, : len(prompt) + len(answer)] = True
        response[b, len(prompt): len(prompt) + len(answer)] = True
        prompts.append(prompt)
        answers.append(answer)
    is_safe = rng.random(rows) < 0.5
    is_safe[: min(rows, 2)] = (True, False)[: min(rows, 2)]  # both labels present
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "response_mask": jnp.asarray(response),
             "is_safe": jnp.asarray(is_safe)}
    return prompts, answers, is_safe, batch


def test_kto_through_the_table_matches_numpy():
    prompts, answers, is_safe, batch = qa_batch(5)
    policy, reference = tables(6), tables(7)
    settings = pairwise.KTOSettings(beta=0.5, desirable_weight=1.3, undesirable_weight=0.8)
    loss, metrics = metrics_of("kto", settings, batch, policy, {"reference": reference})

    def logp(table, prompt, answer):
        seq = (prompt + answer)[:L]
        return numpy_logp(table, seq, range(len(prompt), len(seq)))

    # the mismatched pairs: the prompt of row b and the answer of row b + B/2, cut to L
    mismatched = [(prompts[b], answers[(b + B // 2) % B]) for b in range(B)]
    built = pairwise.mismatched_answers(batch)
    for b, (prompt, answer) in enumerate(mismatched):
        seq = (prompt + answer)[:L]
        got_mask = np.asarray(built["mismatched_attention_mask"][b])
        assert got_mask.sum() == len(seq)
        assert list(np.asarray(built["mismatched_input_ids"][b])[got_mask]) == seq
        assert np.flatnonzero(np.asarray(built["mismatched_response_mask"][b])).tolist() == list(
            range(len(prompt), len(seq)))
    ratio = np.array([logp(policy["table"], p, a) - logp(reference["table"], p, a) for p, a in zip(prompts, answers)])
    z_0 = max(0.0, np.mean([logp(policy["table"], p, a) - logp(reference["table"], p, a) for p, a in mismatched]))
    weight = np.where(is_safe, 1.3, 0.8)
    value = weight * sigmoid(0.5 * np.where(is_safe, ratio - z_0, z_0 - ratio))
    assert loss == pytest.approx(np.mean(weight - value), rel=1e-5)
    assert metrics["kl"] == pytest.approx(z_0, rel=1e-5, abs=1e-6)
    assert metrics["desirable_reward"] == pytest.approx(0.5 * ratio[is_safe].mean(), rel=1e-5)
    assert metrics["undesirable_reward"] == pytest.approx(0.5 * ratio[~is_safe].mean(), rel=1e-5)
    assert metrics["reward_accuracy"] == pytest.approx(np.mean(np.where(is_safe, ratio > z_0, ratio < z_0)))


def test_kto_reference_point_carries_no_gradient_and_is_clamped_at_zero():
    rng = np.random.default_rng(8)
    logp, mismatched, ref, ref_mismatched = (jnp.asarray(rng.normal(-10, 2, size=B), jnp.float32) for _ in range(4))
    desirable = jnp.asarray([True, False] * (B // 2))
    grad = jax.grad(lambda m: pairwise.kto_loss(logp, m, ref, ref_mismatched, desirable, 0.1, 1.0, 1.0)[0])(mismatched)
    assert float(jnp.abs(grad).max()) == 0.0
    below = pairwise.kto_loss(logp, ref_mismatched - 3.0, ref, ref_mismatched, desirable, 0.1, 1.0, 1.0)[1]
    assert float(below["kl"]) == 0.0  # the policy below the reference on mismatched answers: z_0 = max(0, ...)


def test_table_entries_are_consistent_and_errors_name_the_field():
    for name, entry in pairwise.METHODS.items():
        assert entry.window in ("divergence", "response"), name
        assert set(entry.scorers) <= {"reference", "reward", "cost"}, name
        assert entry.window == "response" or len(entry.sides) == 2, name  # the divergence window is of pairs
        entry.settings()  # every field has a default
    assert pairwise.METHODS["kto"].batch_kind == "qa" and pairwise.METHODS["kto"].view is views.qa_examples
    with pytest.raises(ValueError, match="unknown pairwise method 'orpo'; valid: dpo, safe_dpo"):
        pairwise.method("orpo")
    with pytest.raises(ValueError, match=r"config.dpo.tau is 0.0: expected > 0"):
        pairwise.IPOSettings(tau=0.0)
    with pytest.raises(ValueError, match="config.dpo.undesirable_weight is -1"):
        pairwise.KTOSettings(undesirable_weight=-1)
    with pytest.raises(ValueError, match="config.dpo.cost_model_path is empty: the method scores with reference, "
                                         "reward, cost"):
        pairwise.load_frozen(pairwise.METHODS["c_dpo"], pairwise.CDPOSettings(reward_model_path="r"), None, None,
                             None, vocab_size=8, special=None, rng=None)
    _, _, _, one = qa_batch(9, rows=1)
    with pytest.raises(ValueError, match="a \\(micro-\\)batch of 1 answer has none"):
        pairwise.mismatched_answers(one)


# ------------------------------------------------------------------------------------ behaviour on a fixture
#
# Prompt [1, 3]; answers (each + EOS 2): 4 helpful but unsafe, 5 a safe refusal, 6 a good benign
# answer, 7 a vague benign one. Helpfulness prefers 4 over 5 and 6 over 7; only 4 is unsafe.

PROMPT, EOS = [1, 3], 2
UNSAFE, REFUSAL, GOOD, VAGUE = 4, 5, 6, 7


def fixture_pairs(n=8):
    better = np.array([PROMPT + [UNSAFE, EOS], PROMPT + [GOOD, EOS]] * (n // 2), np.int32)
    worse = np.array([PROMPT + [REFUSAL, EOS], PROMPT + [VAGUE, EOS]] * (n // 2), np.int32)
    mask = np.ones_like(better, bool)
    response = np.zeros_like(mask)
    response[:, len(PROMPT):] = True
    return {"better_input_ids": better, "worse_input_ids": worse, "better_attention_mask": mask,
            "worse_attention_mask": mask, "better_response_mask": response, "worse_response_mask": response}


def fixture_answers():
    """Every answer once (twice over), labelled safe unless it is the unsafe one."""
    ids = np.array([PROMPT + [a, EOS] for a in (UNSAFE, REFUSAL, GOOD, VAGUE)] * 2, np.int32)
    mask = np.ones_like(ids, bool)
    response = np.zeros_like(mask)
    response[:, len(PROMPT):] = True
    return {"input_ids": ids, "attention_mask": mask, "response_mask": response, "is_safe": ids[:, 2] != UNSAFE}


def train(name, settings, batch, steps=150):
    """Adam on a zero bigram table (the reference) -> (π(answer | prompt) by answer, last metrics)."""
    entry = pairwise.method(name)
    reference = {"table": jnp.zeros((8, 8))}
    fn = pairwise.make_loss_fn(entry, settings, table_policy)
    tx = optax.adam(0.05)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    @jax.jit
    def step(params, opt_state):
        (_, (metrics, _)), grads = jax.value_and_grad(fn, has_aux=True)(params, batch, None, {},
                                                                         {"reference": reference})
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    params = {"table": jnp.zeros((8, 8))}
    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state, metrics = step(params, opt_state)
    p = np.asarray(jax.nn.softmax(params["table"][PROMPT[-1]]))
    return {a: p[a] for a in (UNSAFE, REFUSAL, GOOD, VAGUE)}, {k: float(v) for k, v in metrics.items()}


def test_ipo_regresses_the_margin_to_its_target_where_dpo_keeps_pushing():
    """IPO's margin h settles at 1/(2τ) (its point: a bounded preference strength); DPO's grows past it."""
    ipo_p, ipo = train("ipo", pairwise.IPOSettings(tau=0.5), fixture_pairs(), steps=300)
    _, dpo = train("dpo", pairwise.DPOSettings(beta=1.0), fixture_pairs(), steps=300)
    print("ipo", ipo, "dpo", dpo)
    assert ipo["reward_margin"] == pytest.approx(1.0, abs=0.05)  # 1/(2τ)
    assert ipo["reward_accuracy"] == 1.0 and ipo_p[UNSAFE] > ipo_p[REFUSAL] and ipo_p[GOOD] > ipo_p[VAGUE]
    assert dpo["reward_margin"] > 3.0


def test_simpo_learns_the_helpfulness_pairs_and_kto_the_safety_labels():
    """SimPO (no reference) on helpfulness pairs raises the helpful answers, the unsafe one included;
    KTO on the per-answer safety labels lowers the unsafe answer below every safe one."""
    simpo_p, simpo = train("simpo", pairwise.SimPOSettings(beta=2.0, gamma=1.0), fixture_pairs())
    kto_p, kto = train("kto", pairwise.KTOSettings(beta=1.0), fixture_answers())
    print("simpo", simpo_p, simpo, "kto", kto_p, kto)
    assert simpo_p[UNSAFE] > simpo_p[REFUSAL] and simpo_p[GOOD] > simpo_p[VAGUE]
    assert simpo["reward_margin"] > 1.0  # past the target margin γ
    assert kto_p[UNSAFE] < min(kto_p[REFUSAL], kto_p[GOOD], kto_p[VAGUE])
    assert kto["reward_accuracy"] == 1.0 and kto["reward_margin"] > 0


# ------------------------------------------------------------------------------------ the stage


def test_jaxalign_train_runs_ipo_simpo_and_kto(tmp_path):
    """Each new method through `jaxalign train` (configs/<method>_tiny.py) on 120 mini rows from a random
    'SFT' export: finite losses and eval metrics, an export that loads and differs from the start."""
    from jaxalign import cli
    from jaxalign.models import hf

    conftest.tiny_rl_inputs(tmp_path, rows=120, policy_dir="sft", score_kinds=())
    _, start = hf.from_pretrained(tmp_path / "sft")
    for stage, keys in (("ipo", ("reward_margin",)), ("simpo", ("better_reward", "worse_reward")),
                        ("kto", ("kl", "desirable_reward", "undesirable_reward"))):
        workdir = tmp_path / stage
        argv = ["train", "--config", f"configs/{stage}_tiny.py", "--workdir", str(workdir),
                f"--config.model.init_path={tmp_path / 'sft'}", f"--config.data.source={tmp_path / 'data'}",
                "--config.data.batch_size=8", "--config.data.eval_batch_size=8", "--config.train.eval_batches=2",
                "--config.train.log_every=1", "--config.train.num_steps=2", "--config.checkpoint.save_every=0"]
        assert cli.main(argv) == 0
        records = metrics_lib.read_metrics(workdir)
        train_records = [m for m in records if "loss" in m]
        assert [m["step"] for m in train_records] == [1, 2]
        for key in ("loss", "reward_accuracy") + keys:
            assert np.isfinite(train_records[-1][key]), (stage, key)
            assert np.isfinite([m[f"eval/{key}"] for m in records if f"eval/{key}" in m]).all(), (stage, key)
        _, exported = hf.from_pretrained(workdir / "export")
        assert not np.allclose(exported["lm_head"]["kernel"], start["lm_head"]["kernel"]), stage
        assert json.loads((workdir / "config.json").read_text())["stage"] == stage
