"""Safe GSPO (rl/algorithms/safe_gspo.py): GSPO's sequence-level ratio loss against a numpy loop,
the actor-loss hook on both actor update paths (alone and fused with PTX), and `jaxalign train`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conftest
from jaxalign.rl import algorithms, steps
from jaxalign.rl.algorithms.safe_gspo import SafeGSPOSettings, gspo_loss
from jaxalign.rl.rollout import score_experience
from test_rl import BATCH, PromptIter, bigram_fns, bigram_params, make_settings, sampled_batch


def numpy_gspo(log_probs, old_log_probs, advantages, mask, clip_low, clip_high):
    """GSPO (arXiv:2507.18071) eq. 5 and 7, one answer at a time in float64, and the gradient of the
    loss (-J) w.r.t. each token's log-prob: -Â_i s_i / |y_i| / G on an answer the clip does not
    cut, 0 on one it does. -> (loss, grad [B,R])."""
    objectives, grad = [], np.zeros(log_probs.shape)
    for i in range(len(log_probs)):
        tokens = np.flatnonzero(mask[i])
        if not len(tokens):  # no answer: adds 0 to the mean over the rows
            objectives.append(0.0)
            continue
        ratio = np.exp(np.mean(log_probs[i, tokens].astype(np.float64) - old_log_probs[i, tokens]))
        advantage = np.mean(advantages[i, tokens].astype(np.float64))
        clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
        objectives.append(min(ratio * advantage, clipped * advantage))
        if ratio * advantage <= clipped * advantage:  # the unclipped term is the min: it carries the gradient
            grad[i, tokens] = -advantage * ratio / len(tokens)
    count = len(objectives)
    return -np.sum(objectives) / count, grad / count


def test_gspo_loss_and_its_gradient_against_numpy():
    rng = np.random.default_rng(0)
    b, r = 8, 7
    mask = np.arange(r)[None, :] < rng.integers(1, r + 1, size=b)[:, None]
    mask[2, 1] = False  # a token masked mid-answer (a sampled <pad>/<unk>)
    mask[5] = False  # a row without a token: 0 in the mean
    old = rng.normal(-2.0, 0.5, size=(b, r)).astype(np.float32)
    # per-answer log-ratios from -0.02 to 0.02: some inside the clip range, some beyond each side
    shift = np.array([-0.02, -1e-4, 0.0, 2e-4, 0.02, 0.01, -0.01, 5e-3], np.float32)
    new = (old + shift[:, None] + rng.normal(0, 1e-5, size=(b, r))).astype(np.float32)
    advantages = np.repeat(rng.choice([-1.5, 0.7, 2.0], size=b)[:, None], r, axis=1).astype(np.float32)
    args = (jnp.asarray(old), jnp.asarray(advantages), jnp.asarray(mask), 3e-4, 4e-4)
    loss, grad = jax.value_and_grad(lambda lp: gspo_loss(lp, *args))(jnp.asarray(new))
    want_loss, want_grad = numpy_gspo(new, old, advantages, mask, 3e-4, 4e-4)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)
    cut = np.all(want_grad == 0, axis=1) & mask.any(axis=1)
    assert 0 < cut.sum() < mask.any(axis=1).sum()  # both cases occur
    # On-policy (s_i = 1) loss and gradient are the per-token PPO-clip's (each answer's token mean first).
    from jaxalign.objectives import ppo

    on_policy = jax.value_and_grad(lambda lp: gspo_loss(lp, *args))(jnp.asarray(old))
    ppo_clip = jax.value_and_grad(lambda lp: ppo.actor_loss(lp, args[0], args[1], args[2], 0.2))(jnp.asarray(old))
    assert float(on_policy[0]) == pytest.approx(-np.where(mask.any(axis=1), advantages[:, 0], 0.0).mean(), rel=1e-6)
    assert float(ppo_clip[0]) == pytest.approx(float(on_policy[0]), rel=1e-6)
    np.testing.assert_allclose(np.asarray(ppo_clip[1]), np.asarray(on_policy[1]), rtol=1e-5, atol=1e-9)


def test_the_actor_loss_hook_runs_on_both_update_paths():
    """steps.train_step calls Algorithm.actor_loss whether the PTX rows get their own policy pass or
    share the rollout's: with SGD the updated params are params - 0.5*(g_GSPO + ptx_coeff*g_PTX) on
    both paths, g_GSPO the gradient of gspo_loss itself; the loss differs from the default PPO-clip."""
    settings = make_settings(num_return_sequences=4, ptx_coeff=2.0, num_minibatches=1)
    gspo = algorithms.make("safe_gspo", True, SafeGSPOSettings(clip_low=0.05, clip_high=0.05))
    fns, params = bigram_fns(), bigram_params(4)
    ids, mask = sampled_batch(4)
    exp, _ = jax.jit(score_experience, static_argnums=(0, 1, 2))(fns, gspo, settings, params, jnp.float32(0.05),
                                                                ids, mask)
    # the old log-probs of a slightly different policy: ratios spread on both sides of the clip range
    exp = exp.replace(old_log_probs=exp.old_log_probs + 0.1 * jax.random.normal(jax.random.PRNGKey(1),
                                                                                 exp.old_log_probs.shape))
    sgd = steps.Optimizers(optax.sgd(1.0), optax.sgd(0.0), optax.constant_schedule(1.0), optax.constant_schedule(0.0))
    state = steps.init_rl_state(gspo, settings, {"actor": params["actor"]}, sgd, jax.random.PRNGKey(0))
    ptx_batch = next(PromptIter(BATCH, "sft", ids.shape[1]))
    lam = jnp.float32(0.5)
    advantages = steps.actor_advantages(gspo, settings, exp, lam)

    def rl_loss(p):
        log_probs = jax.nn.log_softmax(p["table"][ids[:, settings.start:-1]], axis=-1)
        log_probs = jnp.take_along_axis(log_probs, ids[:, settings.start + 1:, None], axis=-1)[..., 0]
        return gspo_loss(log_probs, exp.old_log_probs, advantages, exp.response_mask, 0.05, 0.05)

    g_rl = jax.grad(rl_loss)(state.actor.params)
    g_ptx = jax.grad(lambda p: steps.ptx_loss(fns, p, ptx_batch))(state.actor.params)
    expected = state.actor.params["table"] - 0.5 * (g_rl["table"] + 2.0 * g_ptx["table"])
    assert steps.can_fuse_ptx(exp, ptx_batch)
    train = jax.jit(steps.train_step, static_argnums=(0, 1, 2, 3, 8))
    for stack in (False, True):  # separate passes, then one fused RL + PTX pass
        new_state, metrics = train(fns, gspo, settings, sgd, state, exp, lam, ptx_batch, stack)
        np.testing.assert_allclose(new_state.actor.params["table"], expected, rtol=1e-5, atol=1e-6)
        assert float(metrics["actor_loss"]) == pytest.approx(float(rl_loss(state.actor.params)), rel=1e-5)
    grpo = algorithms.make("safe_grpo", True)
    ppo_clip = steps.actor_rl_loss(fns, grpo, settings, state.actor.params, exp, advantages)
    assert abs(float(ppo_clip) - float(rl_loss(state.actor.params))) > 1e-3


def test_settings_group_and_bad_values():
    from jaxalign import config as config_lib

    config = config_lib.load_config("configs/safe_gspo_tiny.py", ["--config.rl.safe_gspo.clip_high=0.001"])
    settings = algorithms.settings_from_group("safe_gspo", config.rl)
    assert settings == SafeGSPOSettings(threshold=-5.5, episode_cost_window_size=32, clip_low=3e-4, clip_high=1e-3)
    assert algorithms.make("safe_gspo", True, settings).roles == ("actor", "reference", "reward", "cost")
    with pytest.raises(ValueError, match=r"config.rl.safe_gspo.clip_low must be in \(0, 1\)"):
        algorithms.make("safe_gspo", True, SafeGSPOSettings(clip_low=0.0))
    with pytest.raises(ValueError, match="safe_gspo needs a cost model"):
        algorithms.make("safe_gspo", False, settings)
    with pytest.raises(TypeError, match="safe_gspo takes SafeGSPOSettings"):
        algorithms.make("safe_gspo", True, algorithms.settings_from_group("safe_grpo", config.rl))


def test_jaxalign_train_runs_the_safe_gspo_stage(tmp_path):
    """`jaxalign train --config configs/safe_gspo_tiny.py` on 150 mini rows, 16 prompts x 4 answers
    (random actor and score models in the export formats): finite metrics, λ following
    PPO-Lagrangian's rule from its logged episode cost (two λ steps per iteration: two minibatches),
    an export that loads and differs from the initial policy."""
    import math

    from jaxalign import cli
    from jaxalign.models import hf
    from jaxalign.train import metrics as metrics_lib

    tok, cfg, params = conftest.tiny_rl_inputs(tmp_path, rows=150, policy_dir="sft")
    workdir = tmp_path / "run"
    argv = ["train", "--config", "configs/safe_gspo_tiny.py", "--workdir", str(workdir),
            f"--config.model.init_path={tmp_path / 'sft'}", f"--config.data.source={tmp_path / 'data'}",
            f"--config.rl.reward_model_path={tmp_path / 'reward'}", f"--config.rl.cost_model_path={tmp_path / 'cost'}",
            "--config.rl.prompt_length=40", "--config.rl.max_new_tokens=8", "--config.train.num_steps=3",
            "--config.data.batch_size=16",  # 2 minibatches of PTX rows over the tests' 8 devices
            "--config.checkpoint.save_every=3"]
    assert cli.main(argv) == 0
    records = [m for m in metrics_lib.read_metrics(workdir) if "actor_loss" in m]
    assert [m["step"] for m in records] == [1, 2, 3]
    for record in records:
        for key in ("reward", "cost", "lambda", "episode_cost", "actor_loss", "ptx_loss", "kl_divergence",
                    "actor_grad_norm"):
            assert np.isfinite(record[key]), key
        assert "reward_critic_loss" not in record and abs(record["reward_advantage"]) < 1e-5
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["stage"] == "safe_gspo" and saved["rl"]["safe_gspo"]["threshold"] == -5.5
    lam = 1.0  # lambda_init; log λ += 0.1 (J_C + 5.5) λ, capped at 5, once per minibatch
    for record in records:
        for _ in range(2):
            lam = min(math.exp(math.log(lam) + 0.1 * (record["episode_cost"] + 5.5) * lam), 5.0)
        assert record["lambda"] == pytest.approx(lam, rel=1e-4)
    exported_cfg, exported = hf.from_pretrained(workdir / "export")
    assert exported_cfg.vocab_size == len(tok)
    assert not np.allclose(exported["lm_head"]["kernel"], params["lm_head"]["kernel"])
