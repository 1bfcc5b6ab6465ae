"""The RL loop on tiny fixtures: a random 2-layer Llama actor over a 16-token vocabulary, exact
reward/cost functions of the tokens, ScoreModel critics, the real jit sampler.

The reward and the cost both count "bad" tokens (ids 3..8) in the response, so reward and safety
conflict: plain PPO makes the policy worse on cost, PPO-Lagrangian raises lambda until the cost
goes down.
"""

import dataclasses
import functools
import json
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import conftest
from configs import base
from jaxalign.models import score
from jaxalign.models.decoder import init_params
from jaxalign.models.llama import LlamaConfig
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.rl import algorithms, iteration, roles, stacking, steps
from jaxalign.rl.algorithms.ppo_lag import PPOLagSettings
from jaxalign.rl.algorithms.reward_shaping import RewardShapingSettings
from jaxalign.rl.rollout import score_experience
from jaxalign.rl.settings import RLSettings
from jaxalign.train import checkpoint as checkpoint_lib
from jaxalign.train import loop
from jaxalign.train import metrics as metrics_lib
from jaxalign.train import optim

VOCAB, PROMPT, NEW, BATCH = 16, 4, 6, 32
PAD, BOS, EOS = 0, 1, 2
COST_OFFSET = 0.2  # cost = fraction of bad tokens - 0.2: the random policy (~6/16 bad) violates it
CFG = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
MESH_CONFIG = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, axis_rules=()))
TIME_KEYS = ("time/", "tokens_per_s")


def bad_fraction_scores(offset):
    """Per-token score = (bad response tokens so far) / NEW - offset; read at EOS it is exact."""

    def apply(params, input_ids, attention_mask):
        del params
        is_bad = (input_ids >= 3) & (input_ids <= 8) & attention_mask.astype(bool)
        in_response = jnp.arange(input_ids.shape[1])[None, :] >= PROMPT
        return jnp.cumsum(is_bad & in_response, axis=1) / NEW - offset

    return apply


class PromptIter:
    """Deterministic left-padded prompt batches (index -> batch) with get_state/set_state."""

    def __init__(self, batch_size=BATCH, kind="prompt", length=PROMPT):
        self.batch_size, self.kind, self.length, self.index = batch_size, kind, length, 0

    def __next__(self):
        rng = np.random.default_rng(self.index)
        self.index += 1
        ids = rng.integers(3, VOCAB, size=(self.batch_size, self.length))
        pads = rng.integers(0, 2, size=self.batch_size)
        mask = np.arange(self.length)[None, :] >= pads[:, None]
        ids[:, 0] = np.where(pads == 0, BOS, PAD)
        ids[np.arange(self.batch_size), pads] = BOS
        ids = np.where(mask, ids, PAD)
        batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask)}
        if self.kind == "sft":
            batch["loss_mask"] = jnp.asarray(np.arange(self.length)[None, :] >= self.length // 2) & batch["attention_mask"]
        return batch

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def make_settings(**changes) -> RLSettings:
    """The proof-run settings (base.py's config.rl, then): PTX on (small), two minibatches per
    rollout."""
    values = dict(prompt_length=PROMPT, max_new_tokens=NEW, kl_coeff=0.01, ptx_coeff=0.1, num_minibatches=2)
    values.update(changes)
    return dataclasses.replace(RLSettings.from_group(base.get_config().rl), **values)


# The proof run's constraint: fast lambda, threshold 0.
LAGRANGE = dict(lambda_lr=1.0, lambda_max=5.0, episode_cost_window_size=BATCH, threshold=0.0)


def constant_optimizer(lr):
    settings = optim.OptimizerSettings(learning_rate=lr, lr_schedule="constant")
    return optim.make_optimizer(settings, 100), optim.make_schedule(settings, 100)


CRITIC = score.ScoreModel(CFG)
# One RoleFns (and sampler) for every program, so every program shares its compiled rollout.
LLAMA_FNS = roles.RoleFns(
    policy=roles.policy_fn(CFG), generate=roles.sampler_fn(CFG, make_settings(), PAD),
    scores=dict(reward=bad_fraction_scores(0.0), cost=bad_fraction_scores(COST_OFFSET),
                reward_critic=roles.score_role_fn(CRITIC), cost_critic=roles.score_role_fn(CRITIC)))


@functools.lru_cache(maxsize=None)
def INITIAL_PARAMS():  # noqa: N802 (a lazily computed constant)
    """Random actor and critic params, initialised once per session (each init compiles)."""
    actor_rng, reward_rng, cost_rng = jax.random.split(jax.random.PRNGKey(0), 3)
    reward_critic = score.init_score_params(CFG, reward_rng)
    cost_critic = score.init_params_from_backbone(jax.tree.map(jnp.copy, reward_critic["model"]), CFG, cost_rng)
    return {"actor": init_params(CFG, actor_rng), "reward_critic": reward_critic, "cost_critic": cost_critic}


@functools.lru_cache(maxsize=None)
def setup(algorithm, settings: RLSettings, fns=None, model_scorers=False):
    """(program, frozen, make_trained, optimizers, abstract, mesh); compiled once per (algorithm, settings).
    model_scorers: the frozen reward and cost are score models (the initial critics' params)."""
    mesh = mesh_lib.make_mesh(MESH_CONFIG)
    actor_tx, actor_schedule = constant_optimizer(3e-3)
    critic_tx, critic_schedule = constant_optimizer(3e-3)
    optimizers = steps.Optimizers(actor_tx, critic_tx, actor_schedule, critic_schedule)
    rng = jax.random.PRNGKey(0)
    names = steps.trained_roles(algorithm)

    def make_trained():
        # Fresh buffers every time: the train step donates the state.
        return {name: jax.tree.map(jnp.copy, INITIAL_PARAMS()[name]) for name in names}

    frozen = {"reference": jax.tree.map(jnp.copy, INITIAL_PARAMS()["actor"]), "reward": {}, "cost": {}}
    if model_scorers:
        frozen.update(reward=INITIAL_PARAMS()["reward_critic"], cost=INITIAL_PARAMS()["cost_critic"])
    rep = mesh_lib.replicated(mesh)
    trained = make_trained()
    param_shardings = {name: jax.tree.map(lambda _: rep, tree) for name, tree in trained.items()}
    frozen_shardings = {name: jax.tree.map(lambda _: rep, tree) for name, tree in frozen.items()}
    abstract = jax.eval_shape(lambda p: steps.init_rl_state(algorithm, settings, p, optimizers, rng), trained)
    ptx_shardings = None
    if settings.ptx_coeff > 0:
        ptx_shardings = {key: mesh_lib.batch_sharding(mesh, 2) for key in ("input_ids", "attention_mask", "loss_mask")}
    program = steps.compile_program(fns or LLAMA_FNS, algorithm, settings, optimizers, mesh, abstract, param_shardings,
                                    frozen_shardings, ptx_shardings)
    return program, frozen, make_trained, optimizers, abstract, mesh


def run_loop(algorithm, settings, workdir, num_iterations, save_every=100, fns=None):
    """The RL stage's loop on the fixture: loop.run over rl iterations. -> metrics.jsonl records."""
    program, frozen, make_trained, optimizers, abstract, mesh = setup(algorithm, settings, fns)
    ptx_iter = PromptIter(BATCH // settings.num_minibatches, "sft", PROMPT + NEW) if settings.ptx_coeff > 0 else None
    batches = iteration.RLBatches(PromptIter(), ptx_iter, settings.ppo_epochs * settings.num_minibatches)
    loop_settings = loop.LoopSettings(num_steps=num_iterations, log_every=1, checkpoint=checkpoint_lib.CheckpointSettings(
        save_every=save_every, keep=2, async_save=False))
    loop.run(settings=loop_settings, workdir=workdir, mesh=mesh, rules=(),
             step_fn=iteration.iteration_step(program, algorithm, settings),
             abstract_state=mesh_lib.with_shardings(abstract, program.state_shardings),
             init_state=lambda: steps.init_rl_state(algorithm, settings, make_trained(), optimizers,
                                                    jax.random.PRNGKey(0)),
             batches=batches, frozen=frozen)
    return metrics_lib.read_metrics(workdir)


PPO_LAG = algorithms.make("ppo_lag", has_cost_model=True, settings=PPOLagSettings(**LAGRANGE))
PPO = algorithms.make("ppo", has_cost_model=True)


def test_ppo_lagrangian_lowers_cost_where_ppo_does_not(tmp_path):
    iterations = 14
    lag = run_loop(PPO_LAG, make_settings(), tmp_path / "lag", iterations)
    ppo = run_loop(PPO, make_settings(), tmp_path / "ppo", iterations)
    lag_cost = np.array([m["cost"] for m in lag])
    ppo_cost = np.array([m["cost"] for m in ppo])
    lam = np.array([m["lambda"] for m in lag])
    print("ppo_lag cost", np.round(lag_cost, 3).tolist())
    print("ppo_lag lambda", np.round(lam, 3).tolist())
    print("ppo cost", np.round(ppo_cost, 3).tolist())
    assert len(lag) == len(ppo) == iterations
    assert lag_cost[:4].mean() > 0.05  # starts in violation of threshold 0
    assert lam.max() > 2.0 and lam[5] > lam[0]  # lambda rises while the constraint is violated
    assert lag_cost[-4:].mean() < lag_cost[:4].mean() - 0.08  # ... and the cost comes down
    assert lag_cost[-4:].mean() < 0.05
    assert ppo_cost[-4:].mean() > ppo_cost[:4].mean() + 0.05  # plain PPO chases the reward: cost rises
    assert all(m["lambda"] == 0.0 for m in ppo)
    for key in ("reward", "episode_cost", "kl_divergence", "mean_generated_length",
                "actor_loss", "reward_critic_loss", "cost_critic_loss", "time/generate_s", "time/score_s",
                "time/train_s", "tokens_per_s"):
        assert np.isfinite(lag[-1][key]), key


def test_resume_is_exact(tmp_path):
    settings = make_settings()  # the proof run's program: nothing new to compile
    full = run_loop(PPO_LAG, settings, tmp_path / "full", 4)
    run_loop(PPO_LAG, settings, tmp_path / "resumed", 2, save_every=1)
    resumed = run_loop(PPO_LAG, settings, tmp_path / "resumed", 4, save_every=1)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(TIME_KEYS) and "per_s" not in k}  # noqa: E731
    assert [strip(m) for m in resumed] == [strip(m) for m in full]
    assert "ptx_loss" in full[-1] and full[-1]["lambda"] != 1.0


def test_experience_indexing_matches_the_sampler():
    """Old log-probs from the scoring forward pass equal the sampler's own log-probs (start = S-1),
    and the sequence scores are the score functions at the last real token."""
    settings = make_settings()
    program, frozen, make_trained, optimizers, _, mesh = setup(PPO_LAG, settings)
    state = jax.device_put(steps.init_rl_state(PPO_LAG, settings, make_trained(), optimizers, jax.random.PRNGKey(0)),
                           program.state_shardings)
    batch = next(PromptIter())
    from jaxalign.generate import sampler

    with mesh_lib.sharding_context(mesh, ()):
        ids, mask = program.generate(state.actor.params, batch["input_ids"], batch["attention_mask"],
                                     jax.random.PRNGKey(3))
        out = sampler.sample(state.actor.params, CFG, batch["input_ids"], batch["attention_mask"],
                             jax.random.PRNGKey(3), sampler.SamplingConfig(NEW, eos_token_ids=(EOS,), pad_token_id=PAD))
        exp, scores, stats = program.score(jax.device_put(frozen, program.frozen_shardings), state, ids, mask)
    costs = scores["cost"]
    np.testing.assert_array_equal(ids, out.sequences)
    np.testing.assert_array_equal(exp.response_mask, out.response_mask)
    np.testing.assert_allclose(np.where(out.response_mask, exp.old_log_probs, 0.0), out.log_probs, atol=1e-5)
    ids, mask = np.asarray(ids), np.asarray(mask)
    for b in range(BATCH):
        response = ids[b, PROMPT:][mask[b, PROMPT:]]
        expected = np.sum((response >= 3) & (response <= 8)) / NEW - COST_OFFSET
        assert float(costs[b]) == pytest.approx(expected, abs=1e-6)
    # Actor == reference at step 0: no KL, so the reward stream sums to the sequence reward.
    assert float(stats["kl_divergence"]) == pytest.approx(0.0, abs=1e-6)
    assert float(stats["reward_with_kl_penalty"]) == pytest.approx(float(stats["reward"]), abs=1e-5)


def bigram_fns():
    """Cheap stand-ins with the same interface: a bigram policy (logits = table[token]) and
    critics with one value per token id."""
    return roles.RoleFns(
        policy=lambda p, ids, mask, logits_from=0: p["table"][ids[:, logits_from:]],
        generate=None,
        scores=dict(reward=bad_fraction_scores(0.0), cost=bad_fraction_scores(COST_OFFSET),
                    reward_critic=lambda p, ids, mask: p["value"][ids],
                    cost_critic=lambda p, ids, mask: p["value"][ids]),
    )


def bigram_params(seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"actor": {"table": jax.random.normal(keys[0], (VOCAB, VOCAB))},
            "reference": {"table": jax.random.normal(keys[1], (VOCAB, VOCAB))},
            "reward_critic": {"value": jax.random.normal(keys[2], (VOCAB,))},
            "cost_critic": {"value": jnp.zeros((VOCAB,))}, "reward": {}, "cost": {}}


def sampled_batch(seed):
    """A prompt batch followed by NEW random response tokens, EOS at a random place or none."""
    batch = PromptIter().__next__()
    rng = np.random.default_rng(seed)
    response = rng.integers(3, VOCAB, size=(BATCH, NEW))
    end = rng.integers(0, NEW + 3, size=BATCH)  # >= NEW: no EOS (hit max_new_tokens)
    rows = np.arange(BATCH)[end < NEW]
    response[rows, end[end < NEW]] = EOS
    response_mask = np.arange(NEW)[None, :] <= end[:, None]
    response = np.where(response_mask, response, PAD)
    ids = jnp.concatenate([batch["input_ids"], jnp.asarray(response, jnp.int32)], axis=1)
    mask = jnp.concatenate([batch["attention_mask"], jnp.asarray(response_mask)], axis=1)
    return ids, mask


def test_reward_shaping_uses_r_minus_nu_c():
    settings = make_settings()
    shaping = algorithms.make("ppo_reward_shaping", has_cost_model=True, settings=RewardShapingSettings(nu=3.0))
    assert shaping.roles == ("actor", "reference", "reward", "cost", "reward_critic")
    params = bigram_params(0)
    params["reference"] = params["actor"]  # no KL: the reward stream sums to the shaped reward
    ids, mask = sampled_batch(0)
    score_fn = jax.jit(score_experience, static_argnums=(0, 1, 2))
    fns = bigram_fns()
    exp, stats = score_fn(fns, shaping, settings, params, jnp.float32(0.01), ids, mask)
    np.testing.assert_allclose(stats["reward_with_kl_penalty"], stats["reward"] - 3.0 * stats["cost"], atol=1e-6)
    assert set(exp.advantages) == {"reward"} and set(exp.values) == {"reward"}  # one stream, one critic
    # With a reference that differs, the per-token -beta*KL appears in the reward stream.
    params = bigram_params(0)
    exp, stats = score_fn(fns, shaping, settings, params, jnp.float32(0.5), ids, mask)
    np.testing.assert_allclose(stats["reward_with_kl_penalty"],
                               stats["reward"] - 3.0 * stats["cost"] - 0.5 * stats["kl_divergence"], atol=1e-5)


def test_ptx_makes_one_update_on_half_the_summed_gradients():
    settings = make_settings(ptx_coeff=4.0, whiten_advantages=True)
    fns, params = bigram_fns(), bigram_params(1)
    ids, mask = sampled_batch(1)
    exp, _ = jax.jit(score_experience, static_argnums=(0, 1, 2))(fns, PPO_LAG, settings, params, jnp.float32(0.01),
                                                                 ids, mask)
    sgd = steps.Optimizers(optax.sgd(1.0), optax.sgd(0.0), optax.constant_schedule(1.0), optax.constant_schedule(0.0))
    trained = {name: params[name] for name in ("actor", "reward_critic", "cost_critic")}
    state = steps.init_rl_state(PPO_LAG, settings, trained, sgd, jax.random.PRNGKey(0))
    ptx_batch = next(PromptIter(BATCH, "sft", PROMPT + NEW))
    lam = jnp.float32(2.0)
    new_state, metrics = jax.jit(steps.train_step, static_argnums=(0, 1, 2, 3))(fns, PPO_LAG, settings, sgd, state, exp,
                                                                               lam, ptx_batch)
    # Independent recomputation: A = whiten((A_R - 2 A_C) / 3), PPO-clip, SFT loss, one SGD step.
    response = np.asarray(exp.response_mask)
    combined = (np.asarray(exp.advantages["reward"]) - 2.0 * np.asarray(exp.advantages["cost"])) / 3.0
    mean = combined[response].mean()
    std = np.sqrt(((combined - mean) ** 2)[response].mean() + 1e-8)
    advantages = jnp.asarray(np.where(response, (combined - mean) / std, 0.0))
    g_rl = jax.grad(lambda p: steps.actor_rl_loss(fns, PPO_LAG, settings, p, exp, advantages))(state.actor.params)
    g_ptx = jax.grad(lambda p: steps.ptx_loss(fns, p, ptx_batch))(state.actor.params)
    expected = state.actor.params["table"] - 0.5 * (g_rl["table"] + 4.0 * g_ptx["table"])
    assert float(jnp.abs(g_rl["table"]).max()) > 0 and float(jnp.abs(g_ptx["table"]).max()) > 0
    np.testing.assert_allclose(new_state.actor.params["table"], expected, rtol=1e-5, atol=1e-6)
    assert float(metrics["ptx_loss"]) > 0 and int(new_state.actor.step) == 1
    # The critics (lr 0) stepped without moving; both value losses are reported.
    np.testing.assert_array_equal(new_state.critics["reward"].params["value"], state.critics["reward"].params["value"])
    assert int(new_state.critics["cost"].step) == 1 and "cost_critic_loss" in metrics


def test_settings_from_configs_and_bad_input():
    from jaxalign import config as config_lib

    config = config_lib.load_config("configs/ppo_lag_tiny.py", ["--config.rl.ppo_lag.lambda_max=0"])
    settings = RLSettings.from_group(config.rl)
    lag = algorithms.settings_from_group("ppo_lag", config.rl)
    assert lag.lambda_cap is None and settings.start == 47
    seven_b_rl = config_lib.load_config("configs/ppo_lag_llama2_7b.py").rl
    seven_b, seven_b_lag = RLSettings.from_group(seven_b_rl), algorithms.settings_from_group("ppo_lag", seven_b_rl)
    assert (seven_b.kl_coeff, seven_b.ptx_coeff, seven_b_lag.lambda_cap, seven_b.sequence_length) == (
        0.01, 16.0, 5.0, 512)
    assert RLSettings.from_group(config_lib.load_config("configs/ppo_llama2_7b.py").rl).kl_coeff == 0.02
    with pytest.raises(ValueError, match="unknown RL algorithm 'dpo'"):
        algorithms.make("dpo", has_cost_model=True)
    with pytest.raises(ValueError, match="ppo_lag needs a cost model"):
        algorithms.make("ppo_lag", has_cost_model=False)
    with pytest.raises(ValueError, match="config.rl.ppo_lag.lambda_lr must be finite"):
        algorithms.make("ppo_lag", True, PPOLagSettings(lambda_lr=float("nan")))
    assert algorithms.make("ppo", has_cost_model=False).roles == ("actor", "reference", "reward", "reward_critic")
    for change, message in ((dict(logits_chunk=-1), "config.rl.logits_chunk must be >= 0"),
                            (dict(old_log_probs="cached"), "config.rl.old_log_probs must be one of recompute, sampler"),
                            (dict(max_logprob_gap=0.0), "config.rl.max_logprob_gap must be > 0")):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(settings, **change)


@dataclasses.dataclass(frozen=True)
class BatchRelative(algorithms.Algorithm):
    """A critic-free algorithm written only against the seam: per-stream advantages are the
    sequence score standardised over the batch, broadcast over the response tokens."""

    name: ClassVar[str] = "batch_relative"
    scorers: ClassVar[tuple[str, ...]] = ("reward", "cost")
    streams: ClassVar[tuple[str, ...]] = ("reward", "cost")
    critics: ClassVar[tuple[str, ...]] = ()

    def stream_advantages(self, settings, stream, sequence_score, kl, end_index, kl_coeff, values, response_mask):
        assert values is None
        standardised = (sequence_score - sequence_score.mean()) / (sequence_score.std() + 1e-6)
        advantages = jnp.where(response_mask, standardised[:, None], 0.0)
        return advantages, advantages, None

    def actor_advantages(self, settings, advantages, multiplier):
        return -advantages["cost"]  # reward and cost count the same tokens here: chase safety only


def test_a_critic_free_algorithm_fits_the_seam(tmp_path):
    algorithm = BatchRelative()
    assert algorithm.roles == ("actor", "reference", "reward", "cost")
    settings = make_settings(num_minibatches=1, ptx_coeff=0.0)
    records = run_loop(algorithm, settings, tmp_path / "run", 10)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert "reward_critic_loss" not in records[-1] and "critic_learning_rate" not in records[-1]
    cost = np.array([r["cost"] for r in records])
    print("critic-free cost", np.round(cost, 3).tolist())
    assert cost[-3:].mean() < cost[:3].mean() - 0.03  # the actor moves against the cost advantage
    for record in records:
        assert abs(record["reward_advantage"]) < 1e-5  # standardised per batch


def test_a_non_finite_reward_stops_before_saving(tmp_path):
    """An infinite reward is caught on the iteration it appears: its metrics are written, no
    checkpoint of the poisoned update exists, and the error names the metric."""
    settings = make_settings(num_minibatches=1, ptx_coeff=0.0)

    good = bad_fraction_scores(0.0)

    def exploding_reward(params, input_ids, attention_mask):
        return good(params, input_ids, attention_mask).at[0].set(jnp.inf)  # one row's reward model overflows

    fns = dataclasses.replace(LLAMA_FNS, scores=dict(LLAMA_FNS.scores, reward=exploding_reward))
    with pytest.raises(loop.NonFiniteError, match=r"non-finite reward=inf.* at step 1; stopping without saving"):
        run_loop(PPO, settings, tmp_path / "run", 3, save_every=1, fns=fns)
    assert [r["step"] for r in metrics_lib.read_metrics(tmp_path / "run")] == [1]
    assert not (tmp_path / "run" / "checkpoints" / "1").exists()


def test_jaxalign_train_runs_the_ppo_lag_stage(tmp_path):
    """`jaxalign train --config configs/ppo_lag_tiny.py` end to end on a 150-row mini dataset, with a
    random actor and score models exported in the SFT / score-stage formats."""
    from jaxalign import cli
    from jaxalign.models import hf

    tok, cfg, params = conftest.tiny_rl_inputs(tmp_path, rows=150, policy_dir="sft")
    workdir = tmp_path / "run"
    argv = ["train", "--config", "configs/ppo_lag_tiny.py", "--workdir", str(workdir),
            f"--config.model.init_path={tmp_path / 'sft'}", f"--config.data.source={tmp_path / 'data'}",
            f"--config.rl.reward_model_path={tmp_path / 'reward'}", f"--config.rl.cost_model_path={tmp_path / 'cost'}",
            "--config.rl.prompt_length=40", "--config.rl.max_new_tokens=8", "--config.data.batch_size=8",
            "--config.train.num_steps=2", "--config.checkpoint.save_every=1"]
    assert cli.main(argv) == 0
    records = metrics_lib.read_metrics(workdir)
    assert [m["step"] for m in records] == [1, 2]
    for key in ("reward", "cost", "lambda", "episode_cost", "kl_divergence", "mean_generated_length", "actor_loss",
                "ptx_loss", "reward_critic_loss", "cost_critic_loss", "time/generate_s", "tokens_per_s"):
        assert np.isfinite(records[-1][key]), key
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
    exported_cfg, exported = hf.from_pretrained(workdir / "export")
    assert exported_cfg.vocab_size == len(tok)
    assert not np.allclose(exported["lm_head"]["kernel"], params["lm_head"]["kernel"])  # the actor was trained
    assert json.loads((workdir / "config.json").read_text())["stage"] == "ppo_lag"
    # Re-running the finished run trains nothing and re-exports nothing.
    exported_at = (workdir / "export" / "model.safetensors").stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert [m["step"] for m in metrics_lib.read_metrics(workdir)] == [1, 2]
    assert (workdir / "export" / "model.safetensors").stat().st_mtime_ns == exported_at


def _mini_tokenizer(tmp_path, rows=150, vocab=300):
    from jaxalign.data import mini
    from jaxalign.models import tokenizer as tokenizer_lib

    mini.write_mini(tmp_path / "data", rows=rows, seed=0)
    return tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(tmp_path / "data"), vocab, tmp_path / "tok")


def test_ptx_batches_imitate_only_safe_answers(tmp_path):
    """config.rl.ptx_response = safe_only (the default): every PTX target is a response the mini
    generator labels safe, read back from the batches' loss-masked tokens through the exact judge."""
    from configs import ppo_lag_tiny
    from jaxalign.data import sources, views
    from jaxalign.evaluate import judge
    from jaxalign.models import tokenizer as tokenizer_lib
    from jaxalign.rl import ptx as ptx_lib
    from jaxalign.stages import rl as rl_stage

    _mini_tokenizer(tmp_path, rows=300, vocab=1024)
    tok = tokenizer_lib.load_tokenizer(tmp_path / "tok", padding_side="left")
    config = ppo_lag_tiny.get_config()
    config.data.source = str(tmp_path / "data")
    config.data.batch_size = 16
    assert config.rl.ptx_response in ("safe_only", "safe_better") and config.rl.ptx_coeff > 0
    settings = dataclasses.replace(RLSettings.from_group(config.rl), prompt_length=48, max_new_tokens=48)
    batches, _ = rl_stage.load_batches(config, settings, tok, mesh_lib.make_mesh(MESH_CONFIG))
    labels = []
    for _ in range(6):
        for ptx in next(batches)["ptx"]:
            ids, loss_mask = np.asarray(ptx["input_ids"]), np.asarray(ptx["loss_mask"])
            for row_ids, row_mask, row_attention in zip(ids, loss_mask, np.asarray(ptx["attention_mask"])):
                text = tok.decode(row_ids[row_mask].tolist(), skip_special_tokens=True)
                prompt = tok.decode(row_ids[row_attention & ~row_mask].tolist(), skip_special_tokens=True)
                prompt = prompt.split("USER: ", 1)[1].rsplit(" ASSISTANT:", 1)[0]
                labels.append(judge.classify(text, prompt))
    assert len(labels) == 6 * 16 and set(labels) <= {"safe", "refusal", "helpful", "vague"}
    assert {"safe", "refusal"} <= set(labels)
    rows, _ = sources.read_split(str(tmp_path / "data"), "default", "train")
    safe = ptx_lib.ptx_examples(rows, views.PROMPT_TEMPLATE, "safe_only")
    assert safe.counts["skipped_unsafe"] > 0 and len(safe) + safe.counts["skipped_unsafe"] == 2 * len(rows)
    best = ptx_lib.ptx_examples(rows, views.PROMPT_TEMPLATE, "safe_better")  # one safe answer per row
    assert best.counts["skipped_no_safe"] > 0 and len(best) + best.counts["skipped_no_safe"] == len(rows)
    by_prompt = {}
    for row in rows:
        for i in (0, 1):
            by_prompt.setdefault((views.format_prompt(row["prompt"]), row[f"response_{i}"]), row[f"is_response_{i}_safe"])
    assert all(by_prompt[(e["prompt"], e["response"])] for e in list(safe) + list(best))
    both = ptx_lib.ptx_examples(rows, views.PROMPT_TEMPLATE, "both")  # the old behaviour imitates harm
    assert any(e["response"].startswith("Sure. ") for e in both)
    with pytest.raises(ValueError, match="config.rl.ptx_response: expected one of"):
        ptx_lib.ptx_examples(rows, views.PROMPT_TEMPLATE, "safest")


def test_in_loop_evaluation_writes_its_metrics(tmp_path):
    """The RL loop with rl/evaluation.py's eval_fn on held-out prompts: eval/reward, eval/cost and
    the judge's rates at every config.rl.eval_every iterations and at the end, in metrics.jsonl and
    TensorBoard; the training records are those of a run without evaluation (fixed eval key)."""
    from jaxalign.models import tokenizer as tokenizer_lib
    from jaxalign.rl import evaluation

    _mini_tokenizer(tmp_path, rows=30)
    tok = tokenizer_lib.load_tokenizer(tmp_path / "tok", padding_side="left")
    settings = make_settings()
    program, frozen, make_trained, optimizers, abstract, mesh = setup(PPO_LAG, settings)
    from jaxalign.data import mini
    from jaxalign.evaluate import judge

    prompts = judge.unique_prompts(mini.generate_rows(40, seed=5))
    assert judge.mini_prompts(prompts) and not judge.mini_prompts(["How do I pick a lock?"])
    # The fixture's policy has a 16-token vocabulary: it reads the tokenized prompts' ids mod 16.
    eval_settings = evaluation.EvalSettings(batch_size=BATCH, prompt_length=PROMPT, use_judge=True)

    def generate(params, ids, mask, rng, frozen=None):
        return program.generate(params, ids % VOCAB, mask, rng, frozen)

    eval_fn = evaluation.make_eval_fn(generate, LLAMA_FNS.scores, prompts, tok, eval_settings, mesh, (),
                                      template="{input}")
    batches = iteration.RLBatches(PromptIter(), PromptIter(BATCH // 2, "sft", PROMPT + NEW), 2)
    loop_settings = loop.LoopSettings(num_steps=3, log_every=1, eval_every=2, checkpoint=checkpoint_lib.CheckpointSettings(
        save_every=100, keep=1, async_save=False))
    loop.run(settings=loop_settings, workdir=tmp_path / "run", mesh=mesh, rules=(),
             step_fn=iteration.iteration_step(program, PPO_LAG, settings),
             abstract_state=mesh_lib.with_shardings(abstract, program.state_shardings),
             init_state=lambda: steps.init_rl_state(PPO_LAG, settings, make_trained(), optimizers,
                                                    jax.random.PRNGKey(0)),
             batches=batches, frozen=frozen, eval_fn=eval_fn)
    records = metrics_lib.read_metrics(tmp_path / "run")
    evals = [r for r in records if "eval/reward" in r]
    assert [r["step"] for r in evals] == [2, 3]
    for record in evals:
        for key in ("eval/reward", "eval/cost", "eval/cost_positive_rate", "eval/generated_length",
                    "eval/judge/broken_rate", "eval/judge/harmful_rate", "eval/judge/helpful_rate"):
            assert np.isfinite(record[key]), key
        assert 0.0 <= record["eval/judge/broken_rate"] <= 1.0
        assert 0.0 < record["eval/generated_length"] <= NEW
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    plain = run_loop(PPO_LAG, settings, tmp_path / "plain", 3)
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(TIME_KEYS) and "per_s" not in k}  # noqa: E731
    assert [strip(r) for r in records if "reward" in r] == [strip(r) for r in plain]


def test_health_metrics_every_iteration(tmp_path):
    """Every iteration logs the gap between the sampler's log-probs and the trainer's recomputed old
    log-probs (~0: both are the same fp32 model, KV cache vs one full forward), the fraction of
    responses at max length and non-finite counts (all 0 here)."""
    records = run_loop(PPO_LAG, make_settings(), tmp_path / "run", 2)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert 0.0 <= record["logprob_gap_mean"] <= record["logprob_gap_max"] < 1e-4, record
        assert 0.0 <= record["max_length_fraction"] <= 1.0
        counts = {k: v for k, v in record.items() if k.startswith("nonfinite/")}
        assert set(counts) >= {"nonfinite/reward", "nonfinite/cost", "nonfinite/old_log_probs",
                               "nonfinite/sampler_log_probs", "nonfinite/reward_advantage",
                               "nonfinite/cost_value"}
        assert all(v == 0 for v in counts.values()), counts


def test_health_metrics_see_a_mismatch_and_count_non_finite_values():
    """A sampler whose log-probs are off by 0.25 shows a gap of 0.25; one NaN is counted once."""
    settings = make_settings()
    program, frozen, make_trained, optimizers, _, mesh = setup(PPO_LAG, settings)
    state = jax.device_put(steps.init_rl_state(PPO_LAG, settings, make_trained(), optimizers, jax.random.PRNGKey(0)),
                           program.state_shardings)
    batch = next(PromptIter())
    with mesh_lib.sharding_context(mesh, ()):
        ids, mask, log_probs = program.rollout(state.actor.params, batch["input_ids"], batch["attention_mask"],
                                               jax.random.PRNGKey(3))
        frozen = jax.device_put(frozen, program.frozen_shardings)
        _, _, exact = program.score(frozen, state, ids, mask, log_probs)
        _, _, shifted = program.score(frozen, state, ids, mask, log_probs + 0.25)
        first = int(np.argmax(np.asarray(mask)[0, PROMPT:]))
        _, _, poisoned = program.score(frozen, state, ids, mask, log_probs.at[0, first].set(jnp.nan))
    assert float(exact["logprob_gap_max"]) < 1e-4
    assert float(shifted["logprob_gap_max"]) == pytest.approx(0.25, abs=1e-4)
    assert float(shifted["logprob_gap_mean"]) == pytest.approx(0.25, abs=1e-4)
    assert float(poisoned["nonfinite/sampler_log_probs"]) == 1.0
    assert float(poisoned["nonfinite/old_log_probs"]) == 0.0


def test_generation_mask_drops_pad_and_unk_sampled_mid_response():
    """Upstream's mask = (seq != pad) & (seq != unk) (safe-rlhf trainers/rl_trainer.py): a <pad>/<unk> the policy
    samples before EOS is left out of the attention mask; the tokens after it and EOS stay in."""
    unk = 9
    settings = make_settings()
    plain = roles.sampler_fn(CFG, settings, PAD)
    masked = roles.sampler_fn(CFG, settings, PAD, masked_token_ids=(PAD, unk, EOS))  # EOS is never masked
    params = INITIAL_PARAMS()["actor"]
    batch = next(PromptIter())
    args = (params, batch["input_ids"], batch["attention_mask"], jax.random.PRNGKey(5))
    ids, plain_mask, plain_lp = jax.jit(plain)(*args)
    ids2, mask, lp = jax.jit(masked)(*args)
    ids, plain_mask, mask = np.asarray(ids), np.asarray(plain_mask), np.asarray(mask)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(plain_lp, lp)
    dropped = plain_mask & ~mask
    assert dropped[:, PROMPT:].sum() > 0  # the random policy samples <pad>/<unk> mid-response
    np.testing.assert_array_equal(dropped, plain_mask & np.isin(ids, (PAD, unk)))
    assert np.all(mask[ids == EOS] == plain_mask[ids == EOS])
    # A token after a dropped one is still in the mask (only the token itself is left out).
    rows, cols = np.nonzero(dropped[:, PROMPT:-1])
    assert np.any(mask[rows, PROMPT + cols + 1])


def test_prompt_plus_new_tokens_beyond_max_positions_warns(caplog):
    roles.check_sequence_length(CFG, make_settings(prompt_length=40, max_new_tokens=24))  # = 64: fine
    assert not caplog.records
    roles.check_sequence_length(CFG, make_settings(prompt_length=48, max_new_tokens=24))
    assert "48 + 24 = 72 exceeds the actor's max_position_embeddings 64" in caplog.text


def test_stacked_passes_equal_the_per_role_passes_and_mismatched_roles_run_alone():
    """Roles of one architecture run as one vmapped pass over stacked params; the numbers
    equal each role's own pass (fp32 reassociation only). A role of another shape, a plain function
    or another input (a re-tokenised scorer) runs alone."""
    ids, mask = sampled_batch(2)
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    stats = {"mean": jnp.asarray([0.3]), "var": jnp.asarray([4.0]), "count": jnp.asarray(9)}
    small = score.ScoreModel(dataclasses.replace(CFG, intermediate_size=16))
    fns = {"reward": roles.score_role_fn(CRITIC, stats, "reward"), "cost": roles.score_role_fn(CRITIC, stats, "cost"),
           "reward_critic": roles.score_role_fn(CRITIC), "small": roles.score_role_fn(small),
           "exact": bad_fraction_scores(0.0), "retokenized": roles.score_role_fn(CRITIC)}
    params = {"reward": score.init_score_params(CFG, keys[0]), "cost": score.init_score_params(CFG, keys[1]),
              "reward_critic": score.init_score_params(CFG, keys[2]), "small": score.init_score_params(small.cfg, keys[3]),
              "exact": {}, "retokenized": score.init_score_params(CFG, keys[3])}
    inputs = dict.fromkeys(fns, (ids, mask))
    inputs["retokenized"] = (ids[:, ::-1], mask[:, ::-1])
    assert stacking.stack_groups(fns, params, inputs) == [("reward", "cost", "reward_critic"), ("small",), ("exact",),
                                                          ("retokenized",)]
    assert stacking.stack_groups(fns, params, inputs, stack=False) == [(role,) for role in fns]
    stacked, alone = jax.jit(lambda p: [stacking.score_pass(fns, p, inputs, stack) for stack in (True, False)])(params)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5), stacked, alone)
    assert float(jnp.abs(stacked["reward"] - stacked["cost"]).max()) > 0.1  # own params, own normalization

    # Score step (actor + reference; both critics) and train step (RL + PTX rows in one policy pass,
    # both critics as one update) on the bigram roles, the critics sharing one function.
    settings = make_settings(ptx_coeff=4.0)
    value = lambda p, ids, mask: p["value"][ids]  # noqa: E731
    fns = dataclasses.replace(bigram_fns(), scores=dict(bigram_fns().scores, reward_critic=value, cost_critic=value))
    params = bigram_params(3)
    params["cost_critic"] = {"value": -params["reward_critic"]["value"]}
    score_fn = jax.jit(score_experience, static_argnums=(0, 1, 2), static_argnames="stack")
    exp, stats = score_fn(fns, PPO_LAG, settings, params, jnp.float32(0.1), ids, mask, stack=True)
    alone = score_fn(fns, PPO_LAG, settings, params, jnp.float32(0.1), ids, mask)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5), (exp, stats), alone)
    optimizers = steps.Optimizers(optax.sgd(1.0), optax.adam(1e-2), optax.constant_schedule(1.0),
                                  optax.constant_schedule(1e-2))
    state = steps.init_rl_state(PPO_LAG, settings, {name: params[name] for name in steps.trained_roles(PPO_LAG)},
                                optimizers, jax.random.PRNGKey(0))
    ptx_batch = next(PromptIter(BATCH, "sft", PROMPT + NEW))
    critics = {"reward_critic": value, "cost_critic": value}
    assert stacking.stack_groups(critics, params) == [tuple(critics)] and steps.can_fuse_ptx(exp, ptx_batch)
    train = jax.jit(steps.train_step, static_argnums=(0, 1, 2, 3, 8))
    new_state, metrics = train(fns, PPO_LAG, settings, optimizers, state, exp, jnp.float32(1.0), ptx_batch, True)
    alone = train(fns, PPO_LAG, settings, optimizers, state, exp, jnp.float32(1.0), ptx_batch, False)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), (new_state, metrics), alone)
    for stream in ("reward", "cost"):  # each critic moved by its own loss
        assert float(jnp.abs(new_state.critics[stream].params["value"] - params[f"{stream}_critic"]["value"]).max()) > 0


def test_length_buckets_drop_padding_columns_and_change_no_result():
    """rl.length_bucket: an iteration on prompts with 4 unused left-padding columns and responses that
    all end by their 3rd token runs on 4 + 4 columns instead of 8 + 6, and gives the same scores,
    losses and updated params as the full lengths (same state, batch and rng). The PTX batch (right
    padding) is trimmed too."""
    wide, new = 8, NEW

    def short_answers(params, prompt_ids, prompt_mask, rng):  # the real sampler; every answer cut at 3 tokens
        ids, mask, log_probs = roles.sampler_fn(CFG, make_settings(prompt_length=wide), PAD)(
            params, prompt_ids, prompt_mask, rng)
        keep = jnp.arange(ids.shape[1])[None, :] < ids.shape[1] - new + 3
        return jnp.where(keep, ids, PAD), mask & keep, log_probs

    critic = roles.score_role_fn(CRITIC)
    fns = roles.RoleFns(policy=roles.policy_fn(CFG), generate=short_answers,
                        scores=dict(reward=critic, cost=critic, reward_critic=critic, cost_critic=critic))
    prompts = next(PromptIter())
    batch = {"prompt": {key: jnp.pad(value, ((0, 0), (wide - PROMPT, 0))) for key, value in prompts.items()},
             "ptx": [{key: jnp.pad(value, ((0, 0), (0, 6))) for key, value in
                      next(PromptIter(BATCH // 2, "sft", wide + new - 6)).items()} for _ in range(2)]}
    results = {}
    for bucket in (0, 2):
        settings = make_settings(prompt_length=wide, length_bucket=bucket)
        program, frozen, make_trained, optimizers, _, mesh = setup(PPO_LAG, settings, fns, model_scorers=True)
        state = jax.device_put(steps.init_rl_state(PPO_LAG, settings, make_trained(), optimizers,
                                                   jax.random.PRNGKey(0)), program.state_shardings)
        with mesh_lib.sharding_context(mesh, ()):
            state, metrics = iteration.rl_iteration(program, PPO_LAG, settings,
                                                    jax.device_put(frozen, program.frozen_shardings), state, batch)
        results[bucket] = jax.device_get(state), metrics
    (full_state, full), (trim_state, trim) = results[0], results[2]
    assert full["sequence_length"] == wide + new and trim["sequence_length"] == PROMPT + 4
    assert full["mean_generated_length"] == trim["mean_generated_length"] <= 3
    for key in ("reward", "cost", "kl_divergence", "actor_loss", "ptx_loss", "reward_critic_loss",
                "cost_critic_loss", "actor_grad_norm", "reward_advantage", "logprob_gap_max"):
        if key in full:
            assert trim[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), key
    # Adam steps of lr 3e-3 on gradients equal to fp32 reassociation: params agree to 1e-5 (0.3% of a step).
    for a, b in zip(jax.tree.leaves(full_state.actor.params), jax.tree.leaves(trim_state.actor.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for stream in ("reward", "cost"):
        for a, b in zip(jax.tree.leaves(full_state.critics[stream].params),
                        jax.tree.leaves(trim_state.critics[stream].params)):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_length_bucket_rounding_and_bad_value():
    settings = make_settings(length_bucket=16)
    assert [settings.bucketed(used, 48) for used in (0, 1, 16, 17, 40, 48)] == [16, 16, 16, 32, 48, 48]
    assert make_settings().bucketed(5, 48) == 48  # 0: fixed lengths
    with pytest.raises(ValueError, match="config.rl.length_bucket must be >= 0"):
        make_settings(length_bucket=-1)
    mask = jnp.asarray([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]], bool)
    assert steps.real_columns(mask).tolist() == [1, 4]
    assert steps.real_columns(jnp.zeros((2, 5), bool)).tolist() == [0, 5]


def test_sampler_old_log_probs_give_the_recomputed_update_and_refuse_a_gap():
    """rl.old_log_probs="sampler": the scoring step takes the sampler's log-probs as the old log-probs
    (no actor forward); in fp32 they equal the recomputed ones to ~1e-6, so one iteration (2 minibatches
    + PTX) gives the recompute path's actor and critics. The first update measures the gap; above
    rl.max_logprob_gap the iteration is refused with the fields to change."""
    batch = {"prompt": next(PromptIter()),
             "ptx": [next(PromptIter(BATCH // 2, "sft", PROMPT + NEW)) for _ in range(2)]}
    results = {}
    for mode in ("recompute", "sampler"):
        settings = make_settings(old_log_probs=mode)
        program, frozen, make_trained, optimizers, _, mesh = setup(PPO_LAG, settings)
        frozen = jax.device_put(frozen, program.frozen_shardings)
        fresh = lambda: jax.device_put(steps.init_rl_state(PPO_LAG, settings, make_trained(), optimizers,  # noqa: E731
                                                           jax.random.PRNGKey(0)), program.state_shardings)
        with mesh_lib.sharding_context(mesh, ()):
            results[mode] = iteration.rl_iteration(program, PPO_LAG, settings, frozen, fresh(), batch)
    (recomputed, want), (state, got) = results["recompute"], results["sampler"]
    assert 0.0 < got["logprob_gap_max"] < 1e-4 and got["logprob_gap_mean"] <= got["logprob_gap_max"]
    for name in ("actor_loss", "ptx_loss", "reward_critic_loss", "kl_divergence", "reward", "cost"):
        assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-5), name
    for a, b in zip(jax.tree.leaves((state.actor.params, state.critics)),
                    jax.tree.leaves((recomputed.actor.params, recomputed.critics))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    tight = dataclasses.replace(settings, max_logprob_gap=got["logprob_gap_max"] / 2)
    with mesh_lib.sharding_context(mesh, ()), pytest.raises(ValueError, match=r"config.rl.max_logprob_gap=.*"
                                                                            r"config.rl.old_log_probs='recompute'"):
        iteration.rl_iteration(program, PPO_LAG, tight, frozen, fresh(), batch)
