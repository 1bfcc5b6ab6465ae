"""The RL loop on tiny fixtures: a random 2-layer Llama actor over a 16-token vocabulary, exact
reward/cost functions of the tokens, ScoreModel critics, the real jit sampler.

The reward and the cost both count "bad" tokens (ids 3..8) in the response, so reward and safety
conflict: plain PPO makes the policy worse on cost, PPO-Lagrangian raises lambda until the cost
goes down.
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxalign.models import score
from jaxalign.models.llama import LlamaConfig, init_params
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.rl import ppo_lag, roles
from jaxalign.rl.settings import RLSettings
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


def make_settings(algorithm, **changes):
    """The proof-run settings: PTX on (small), two minibatches per rollout, fast lambda."""
    values = dict(algorithm=algorithm, prompt_length=PROMPT, max_new_tokens=NEW, kl_coeff=0.01, ptx_coeff=0.1,
                  num_minibatches=2, lambda_lr=1.0, lambda_max=5.0, episode_cost_window_size=BATCH)
    values.update(changes)
    return RLSettings(**values)


def constant_optimizer(lr):
    train = ml_collections.ConfigDict(dict(learning_rate=lr, lr_schedule="constant", warmup_ratio=0.0,
                                           weight_decay=0.0, max_grad_norm=1.0))
    return optim.make_optimizer(train, 100), optim.make_schedule(train, 100)


CRITIC = score.ScoreModel(CFG)
# One sampler function for every settings object, so every program shares its compiled rollout.
LLAMA_FNS = dict(policy=roles.llama_policy(CFG), generate=roles.sampler_fn(CFG, make_settings("ppo"), PAD),
                 reward=bad_fraction_scores(0.0), cost=bad_fraction_scores(COST_OFFSET),
                 reward_critic=roles.score_role_fn(CRITIC), cost_critic=roles.score_role_fn(CRITIC))


@functools.lru_cache(maxsize=None)
def INITIAL_PARAMS():  # noqa: N802 (a lazily computed constant)
    """Random actor and critic params, initialised once per session (each init compiles)."""
    actor_rng, reward_rng, cost_rng = jax.random.split(jax.random.PRNGKey(0), 3)
    reward_critic = score.init_score_params(CFG, reward_rng)
    cost_critic = score.init_params_from_llama(jax.tree.map(jnp.copy, reward_critic["model"]), CFG, cost_rng)
    return {"actor": init_params(CFG, actor_rng), "reward_critic": reward_critic, "cost_critic": cost_critic}


@functools.lru_cache(maxsize=None)
def setup(settings: RLSettings):
    """(program, fns, frozen, make_trained, optimizers, abstract, mesh); compiled once per settings."""
    mesh = mesh_lib.make_mesh(MESH_CONFIG)
    fns = roles.RoleFns(**LLAMA_FNS)
    actor_tx, actor_schedule = constant_optimizer(3e-3)
    critic_tx, critic_schedule = constant_optimizer(3e-3)
    optimizers = ppo_lag.Optimizers(actor_tx, critic_tx, actor_schedule, critic_schedule)
    rng = jax.random.PRNGKey(0)
    names = ("actor", "reward_critic") + (("cost_critic",) if settings.use_cost_critic else ())

    def make_trained():
        # Fresh buffers every time: the train step donates the state.
        return {name: jax.tree.map(jnp.copy, INITIAL_PARAMS()[name]) for name in names}

    frozen = {"reference": jax.tree.map(jnp.copy, INITIAL_PARAMS()["actor"]), "reward": {}, "cost": {}}
    rep = mesh_lib.replicated(mesh)
    trained = make_trained()
    param_shardings = {name: jax.tree.map(lambda _: rep, tree) for name, tree in trained.items()}
    frozen_shardings = {name: jax.tree.map(lambda _: rep, tree) for name, tree in frozen.items()}
    abstract = jax.eval_shape(lambda p: ppo_lag.init_rl_state(settings, p, optimizers, rng), trained)
    ptx_shardings = None
    if settings.ptx_coeff > 0:
        ptx_shardings = {key: mesh_lib.batch_sharding(mesh, 2) for key in ("input_ids", "attention_mask", "loss_mask")}
    program = ppo_lag.compile_program(fns, settings, optimizers, mesh, abstract, param_shardings, frozen_shardings,
                                      ptx_shardings)
    return program, fns, frozen, make_trained, optimizers, abstract, mesh


def run_loop(settings, workdir, num_iterations, save_every=100):
    program, _, frozen, make_trained, optimizers, abstract, mesh = setup(settings)
    ptx_iter = PromptIter(BATCH // settings.num_minibatches, "sft", PROMPT + NEW) if settings.ptx_coeff > 0 else None
    checkpoint = ml_collections.ConfigDict(dict(save_every=save_every, keep=2, async_save=False))
    ppo_lag.train_loop(
        program=program, settings=settings, frozen=frozen,
        init_state=lambda: ppo_lag.init_rl_state(settings, make_trained(), optimizers, jax.random.PRNGKey(0)),
        abstract_state=abstract, prompt_iter=PromptIter(), ptx_iter=ptx_iter, num_iterations=num_iterations,
        workdir=workdir, checkpoint_config=checkpoint, mesh=mesh, rules=(), log=print)
    return metrics_lib.read_metrics(workdir)


def test_ppo_lagrangian_lowers_cost_where_ppo_does_not(tmp_path):
    iterations = 14
    lag = run_loop(make_settings("ppo_lag"), tmp_path / "lag", iterations)
    ppo = run_loop(make_settings("ppo"), tmp_path / "ppo", iterations)
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
    settings = make_settings("ppo_lag")  # the proof run's program: nothing new to compile
    full = run_loop(settings, tmp_path / "full", 4)
    run_loop(settings, tmp_path / "resumed", 2, save_every=1)
    resumed = run_loop(settings, tmp_path / "resumed", 4, save_every=1)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(TIME_KEYS) and "per_s" not in k}  # noqa: E731
    assert [strip(m) for m in resumed] == [strip(m) for m in full]
    assert "ptx_loss" in full[-1] and full[-1]["lambda"] != 1.0


def test_experience_indexing_matches_the_sampler():
    """Old log-probs from the scoring forward pass equal the sampler's own log-probs (start = S-1),
    and the sequence scores are the score functions at the last real token."""
    settings = make_settings("ppo_lag")
    program, fns, frozen, make_trained, optimizers, _, mesh = setup(settings)
    state = jax.device_put(ppo_lag.init_rl_state(settings, make_trained(), optimizers, jax.random.PRNGKey(0)),
                           program.state_shardings)
    batch = next(PromptIter())
    from jaxalign.generate import sampler

    with mesh_lib.sharding_context(mesh, ()):
        ids, mask = program.generate(state.actor.params, batch["input_ids"], batch["attention_mask"],
                                     jax.random.PRNGKey(3))
        out = sampler.sample(state.actor.params, CFG, batch["input_ids"], batch["attention_mask"],
                             jax.random.PRNGKey(3), sampler.SamplingConfig(NEW, eos_token_ids=(EOS,), pad_token_id=PAD))
        exp, costs, stats = program.score(jax.device_put(frozen, program.frozen_shardings), state, ids, mask)
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
        policy=lambda p, ids, mask: p["table"][ids],
        generate=None,
        reward=bad_fraction_scores(0.0),
        cost=bad_fraction_scores(COST_OFFSET),
        reward_critic=lambda p, ids, mask: p["value"][ids],
        cost_critic=lambda p, ids, mask: p["value"][ids],
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
    settings = make_settings("ppo_reward_shaping", lambda_init=3.0)
    params = bigram_params(0)
    params["reference"] = params["actor"]  # no KL: the reward stream sums to the shaped reward
    ids, mask = sampled_batch(0)
    score_fn = jax.jit(ppo_lag.score_experience, static_argnums=(0, 1))
    fns = bigram_fns()
    exp, stats = score_fn(fns, settings, params, jnp.float32(0.01), ids, mask)
    np.testing.assert_allclose(stats["reward_with_kl_penalty"], stats["reward"] - 3.0 * stats["cost"], atol=1e-6)
    assert np.all(np.asarray(exp.cost_advantages) == 0.0)
    # With a reference that differs, the per-token -beta*KL appears in the reward stream.
    params = bigram_params(0)
    exp, stats = score_fn(fns, settings, params, jnp.float32(0.5), ids, mask)
    np.testing.assert_allclose(stats["reward_with_kl_penalty"],
                               stats["reward"] - 3.0 * stats["cost"] - 0.5 * stats["kl_divergence"], atol=1e-5)


def test_ptx_makes_one_update_on_half_the_summed_gradients():
    settings = make_settings("ppo_lag", ptx_coeff=4.0, whiten_advantages=True)
    fns, params = bigram_fns(), bigram_params(1)
    ids, mask = sampled_batch(1)
    exp, _ = jax.jit(ppo_lag.score_experience, static_argnums=(0, 1))(fns, settings, params, jnp.float32(0.01), ids, mask)
    sgd = ppo_lag.Optimizers(optax.sgd(1.0), optax.sgd(0.0), optax.constant_schedule(1.0), optax.constant_schedule(0.0))
    trained = {name: params[name] for name in ("actor", "reward_critic", "cost_critic")}
    state = ppo_lag.init_rl_state(settings, trained, sgd, jax.random.PRNGKey(0))
    ptx_batch = next(PromptIter(BATCH, "sft", PROMPT + NEW))
    lam = jnp.float32(2.0)
    new_state, metrics = jax.jit(ppo_lag.train_step, static_argnums=(0, 1, 2))(fns, settings, sgd, state, exp, lam,
                                                                             ptx_batch)
    # Independent recomputation: A = whiten((A_R - 2 A_C) / 3), PPO-clip, SFT loss, one SGD step.
    response = np.asarray(exp.response_mask)
    combined = (np.asarray(exp.reward_advantages) - 2.0 * np.asarray(exp.cost_advantages)) / 3.0
    mean = combined[response].mean()
    std = np.sqrt(((combined - mean) ** 2)[response].mean() + 1e-8)
    advantages = jnp.asarray(np.where(response, (combined - mean) / std, 0.0))
    g_rl = jax.grad(lambda p: ppo_lag.actor_rl_loss(fns, settings, p, exp, advantages))(state.actor.params)
    g_ptx = jax.grad(lambda p: ppo_lag.ptx_loss(fns, p, ptx_batch))(state.actor.params)
    expected = state.actor.params["table"] - 0.5 * (g_rl["table"] + 4.0 * g_ptx["table"])
    assert float(jnp.abs(g_rl["table"]).max()) > 0 and float(jnp.abs(g_ptx["table"]).max()) > 0
    np.testing.assert_allclose(new_state.actor.params["table"], expected, rtol=1e-5, atol=1e-6)
    assert float(metrics["ptx_loss"]) > 0 and int(new_state.actor.step) == 1
    # The critics (lr 0) stepped without moving; both value losses are reported.
    np.testing.assert_array_equal(new_state.reward_critic.params["value"], state.reward_critic.params["value"])
    assert int(new_state.cost_critic.step) == 1 and "cost_critic_loss" in metrics


def test_settings_from_configs_and_bad_input():
    from jaxalign import config as config_lib

    config = config_lib.load_config("configs/ppo_lag_tiny.py", ["--config.rl.lambda_max=0"])
    settings = RLSettings.from_config(config)
    assert settings.algorithm == "ppo_lag" and settings.lambda_max is None and settings.start == 47
    seven_b = RLSettings.from_config(config_lib.load_config("configs/ppo_lag_llama2_7b.py"))
    assert (seven_b.kl_coeff, seven_b.ptx_coeff, seven_b.lambda_max, seven_b.sequence_length) == (0.01, 16.0, 5.0, 512)
    assert RLSettings.from_config(config_lib.load_config("configs/ppo_llama2_7b.py")).kl_coeff == 0.02
    with pytest.raises(ValueError, match="algorithm"):
        make_settings("dpo")
    with pytest.raises(ValueError, match="cost model"):
        RLSettings(algorithm="ppo_lag", use_cost_model=False)


def test_jaxalign_train_runs_the_ppo_lag_stage(tmp_path):
    """`jaxalign train --config configs/ppo_lag_tiny.py` end to end on a 150-row mini dataset, with a
    random actor and score models exported in the SFT / score-stage formats."""
    from jaxalign import cli
    from jaxalign.data import mini
    from jaxalign.models import hf, llama
    from jaxalign.models import tokenizer as tokenizer_lib

    mini.write_mini(tmp_path / "data", rows=150, seed=0)
    tok = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(tmp_path / "data"), 300, tmp_path / "tok")
    cfg = llama.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    params = init_params(cfg, jax.random.PRNGKey(0))
    hf.save_pretrained(tmp_path / "sft", cfg, params)
    tok.save_pretrained(str(tmp_path / "sft"))
    for seed, kind in enumerate(("reward", "cost")):
        head_params = score.init_params_from_llama(params["model"], cfg, jax.random.PRNGKey(seed + 1))
        score.save_score_model(tmp_path / kind, cfg, head_params, score.ScoreHead(score_type=kind))
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
