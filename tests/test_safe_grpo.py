"""Safe GRPO (rl/algorithms/safe_grpo.py) on test_rl.py's fixtures: a random 2-layer Llama actor,
exact reward/cost functions that count "bad" tokens (so reward and safety conflict), the real
jit sampler, k responses per prompt."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from jaxalign.rl import algorithms, iteration, steps
from jaxalign.rl.algorithms.ppo_lag import LagrangeSettings
from jaxalign.rl.algorithms.safe_grpo import group_normalize
from jaxalign.rl.rollout import score_experience
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import checkpoint as checkpoint_lib
from jaxalign.train import loop
from jaxalign.train import metrics as metrics_lib
from test_rl import LAGRANGE, TIME_KEYS, PromptIter, bigram_fns, bigram_params, make_settings, sampled_batch, setup

K = 4  # responses per prompt
PROMPTS = 8  # prompts per iteration: 32 sequences, the size of test_rl's PPO-Lagrangian batches
SAFE_GRPO = algorithms.make("safe_grpo", has_cost_model=True, settings=LagrangeSettings(**LAGRANGE))


def grpo_settings(**changes):
    values = dict(num_return_sequences=K, num_minibatches=1, ptx_coeff=0.0)
    values.update(changes)
    return make_settings(**values)


def numpy_group_normalize(x, k):
    out = np.zeros_like(x, dtype=np.float64)
    for g in range(len(x) // k):
        part = x[g * k:(g + 1) * k].astype(np.float64)
        std = part.std()
        out[g * k:(g + 1) * k] = 0.0 if std <= 1e-6 else (part - part.mean()) / std
    return out


def test_group_normalize_matches_numpy_and_equal_groups_give_zero():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=12).astype(np.float32)
    scores[4:8] = 0.1  # a group of equal rewards (0.1 is not exact in binary: the mean is not either)
    scores[8:12] = np.float32(3e7)  # equal and large
    got = np.asarray(group_normalize(jnp.asarray(scores), 4))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, numpy_group_normalize(scores, 4), atol=1e-5)
    assert np.all(got[4:12] == 0.0)
    np.testing.assert_allclose(got[:4].mean(), 0.0, atol=1e-6)
    assert np.all(np.asarray(group_normalize(jnp.asarray(scores), 1)) == 0.0)  # a group of one carries no signal
    grad = jax.grad(lambda s: jnp.sum(group_normalize(s, 4) ** 2))(jnp.full((8,), 0.5))
    assert np.all(np.isfinite(np.asarray(grad)))  # even through the equal-group branch


def test_advantages_are_normalised_per_stream_then_combined_with_lambda():
    """The experience of a rollout: per group, each stream's advantage is its KL-shaped sequence score
    standardised within the group (separately for reward and cost), the same on every response token;
    the actor's advantage is (A_R - λ A_C) / (1 + λ)."""
    settings = grpo_settings()
    assert SAFE_GRPO.roles == ("actor", "reference", "reward", "cost") and SAFE_GRPO.critics == ()
    params = bigram_params(0)
    ids, mask = sampled_batch(0)  # 32 rows = 8 groups of 4
    exp, stats = jax.jit(score_experience, static_argnums=(0, 1, 2))(bigram_fns(), SAFE_GRPO, settings, params,
                                                                     jnp.float32(0.05), ids, mask)
    response = np.asarray(exp.response_mask)
    assert exp.values == {} and exp.returns == {}
    for stream, sign in (("reward", -1.0), ("cost", 1.0)):
        total = np.asarray(stats[stream]) + sign * 0.05 * np.asarray(stats["kl_divergence"])
        np.testing.assert_allclose(stats[f"{stream}_with_kl_penalty"], total, atol=1e-5)
        expected = numpy_group_normalize(total, K)
        advantages = np.asarray(exp.advantages[stream])
        np.testing.assert_allclose(np.where(response, advantages, 0.0),
                                   np.where(response, expected[:, None], 0.0), atol=1e-5)
        assert np.all(advantages[~response] == 0.0)
    lam = jnp.float32(2.0)
    actor = steps.actor_advantages(SAFE_GRPO, settings, exp, lam)
    np.testing.assert_allclose(actor, (exp.advantages["reward"] - 2.0 * exp.advantages["cost"]) / 3.0, atol=1e-6)
    with pytest.raises(ValueError, match="num_return_sequences >= 2"):
        score_experience(bigram_fns(), SAFE_GRPO, make_settings(), params, jnp.float32(0.05), ids, mask)


def run_grpo(settings, workdir, num_iterations, save_every=100, algorithm=SAFE_GRPO):
    """The RL stage's loop (loop.run over rl iterations) with PROMPTS prompts x K responses."""
    program, frozen, make_trained, optimizers, abstract, mesh = setup(algorithm, settings)
    batches = iteration.RLBatches(PromptIter(PROMPTS), None, settings.ppo_epochs * settings.num_minibatches)
    loop.run(settings=loop.LoopSettings(num_steps=num_iterations, log_every=1,
                                        checkpoint=checkpoint_lib.CheckpointSettings(save_every=save_every, keep=2,
                                                                                     async_save=False)),
             workdir=workdir, mesh=mesh, rules=(), step_fn=iteration.iteration_step(program, algorithm, settings),
             abstract_state=mesh_lib.with_shardings(abstract, program.state_shardings),
             init_state=lambda: steps.init_rl_state(algorithm, settings, make_trained(), optimizers,
                                                    jax.random.PRNGKey(0)),
             batches=batches, frozen=frozen)
    return metrics_lib.read_metrics(workdir)


def test_safe_grpo_raises_lambda_and_lowers_cost(tmp_path):
    """Reward and cost count the same tokens: starting in violation of threshold 0, λ rises and the
    cost comes down, with no critic in the state; a group's reward advantages average 0."""
    records = run_grpo(grpo_settings(), tmp_path / "run", 14)
    cost = np.array([m["cost"] for m in records])
    lam = np.array([m["lambda"] for m in records])
    print("safe_grpo cost", np.round(cost, 3).tolist())
    print("safe_grpo lambda", np.round(lam, 3).tolist())
    assert cost[:4].mean() > 0.05  # starts in violation
    # λ rises at every step while the windowed cost is above the threshold (the first 4 iterations) ...
    assert np.all(np.diff(lam[:4]) > 0) and lam.max() > lam[0] + 0.1
    assert lam[-1] < lam.max() - 0.3  # ... and falls back once the cost is below the threshold
    assert cost[-4:].mean() < cost[:4].mean() - 0.08
    assert cost[-4:].mean() < 0.05
    for record in records:
        assert abs(record["reward_advantage"]) < 1e-5 and abs(record["cost_advantage"]) < 1e-5
        assert "reward_critic_loss" not in record and "critic_learning_rate" not in record
    assert records[-1]["mean_generated_length"] > 0


def test_resume_is_exact(tmp_path):
    settings = grpo_settings()
    full = run_grpo(settings, tmp_path / "full", 4)
    run_grpo(settings, tmp_path / "resumed", 2, save_every=1)
    resumed = run_grpo(settings, tmp_path / "resumed", 4, save_every=1)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(TIME_KEYS) and "per_s" not in k}  # noqa: E731
    assert [strip(m) for m in resumed] == [strip(m) for m in full]
    assert full[-1]["lambda"] != 1.0


def test_the_state_holds_no_critic():
    """Memory: the RL state of safe_grpo is the actor's TrainState and λ; PPO-Lagrangian adds two critics
    with their AdamW moments (for a 7B policy: 2 x ~108 GB fp32, see experiments/benchmark_rl.py)."""
    settings = grpo_settings()
    _, _, make_trained, optimizers, abstract, _ = setup(SAFE_GRPO, settings)
    assert abstract.critics == {}
    lag = algorithms.make("ppo_lag", has_cost_model=True)
    assert steps.trained_roles(SAFE_GRPO) == ("actor",) and steps.trained_roles(lag) == (
        "actor", "reward_critic", "cost_critic")
    assert dataclasses.replace(settings, num_return_sequences=1).num_return_sequences == 1
    with pytest.raises(ValueError, match="config.rl.num_return_sequences must be >= 1"):
        grpo_settings(num_return_sequences=0)


def test_jaxalign_train_runs_the_safe_grpo_stage(tmp_path):
    """`jaxalign train --config configs/safe_grpo_tiny.py` on 150 mini rows: 8 prompts x 4 responses per
    iteration, random actor and score models in the SFT / score-stage export formats."""
    import json

    from jaxalign import cli
    from jaxalign.models import hf

    tok, cfg, params = conftest.tiny_rl_inputs(tmp_path, rows=150, policy_dir="sft")
    workdir = tmp_path / "run"
    argv = ["train", "--config", "configs/safe_grpo_tiny.py", "--workdir", str(workdir),
            f"--config.model.init_path={tmp_path / 'sft'}", f"--config.data.source={tmp_path / 'data'}",
            f"--config.rl.reward_model_path={tmp_path / 'reward'}", f"--config.rl.cost_model_path={tmp_path / 'cost'}",
            "--config.rl.prompt_length=40", "--config.rl.max_new_tokens=8", "--config.data.batch_size=8",
            "--config.train.num_steps=2", "--config.checkpoint.save_every=1"]
    assert cli.main(argv) == 0
    records = [m for m in metrics_lib.read_metrics(workdir) if "actor_loss" in m]  # (eval/ records apart)
    assert [m["step"] for m in records] == [1, 2]
    for key in ("reward", "cost", "lambda", "episode_cost", "actor_loss", "ptx_loss", "reward_advantage"):
        assert np.isfinite(records[-1][key]), key
    assert "reward_critic_loss" not in records[-1]
    assert json.loads((workdir / "config.json").read_text())["rl"]["num_return_sequences"] == 4
    _, exported = hf.from_pretrained(workdir / "export")
    assert not np.allclose(exported["lm_head"]["kernel"], params["lm_head"]["kernel"])
