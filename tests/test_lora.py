"""LoRA (models/lora.py through qwix): the adapted model, gradients on the adapters only, the SFT stage
(learns, resumes bitwise, merged and adapters exports) and an RL iteration with a LoRA actor."""

import dataclasses
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import cli
from jaxalign import config as config_lib
from jaxalign.models import decoder, hf, llama, loading, lora
from jaxalign.models import tokenizer as tokenizer_lib
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.stages import commands
from jaxalign.train import metrics as metrics_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = lora.LoraSettings(rank=4, alpha=8.0)


def _tiny(scan_layers=True, dtype="float32"):
    return llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, scan_layers=scan_layers, dtype=dtype)


def _mesh():
    return mesh_lib.make_mesh(mesh_lib.MeshSettings(fsdp=-1)), mesh_lib.DEFAULT_AXIS_RULES


def test_fresh_adapters_leave_the_model_unchanged_and_merge_matches():
    cfg = _tiny()
    mesh, rules = _mesh()
    module = llama.Llama(cfg)
    base = decoder.init_params(cfg, jax.random.PRNGKey(0))
    adapters, shardings = lora.init_adapters(module, SETTINGS, jax.random.PRNGKey(1), mesh, rules)
    layer = adapters["model"]["layers"]
    assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(layer["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    assert layer["self_attn"]["o_proj"]["kernel_lora_b"].shape == (2, 4, 32)  # [L, r, D]
    # B [r, D] is sharded like the embed axis it writes (qwix named it head_dim)
    assert shardings["model"]["layers"]["self_attn"]["o_proj"]["kernel_lora_b"].spec[-1] == "fsdp"
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, cfg.vocab_size)
    wrapped = lora.wrap(module, SETTINGS)
    adapted = jax.jit(lambda b, a: wrapped.apply({"params": lora.combine(b, a)}, ids).logits)
    plain = jax.jit(lambda p: module.apply({"params": p}, ids).logits)
    # B = 0: the base model's logits (to rounding: XLA fuses the extra matmuls differently)
    np.testing.assert_allclose(np.asarray(adapted(base, adapters)), np.asarray(plain(base)), atol=1e-6, rtol=0)
    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(3), x.shape), adapters)
    out = np.asarray(adapted(base, trained))
    assert np.abs(out - np.asarray(plain(base))).max() > 1e-3
    np.testing.assert_allclose(np.asarray(plain(lora.merge(base, trained, SETTINGS))), out, atol=1e-5)


def test_unscanned_bf16_model_gets_gradients_on_every_adapter_only():
    cfg = _tiny(scan_layers=False, dtype="bfloat16")
    mesh, rules = _mesh()
    module = llama.Llama(cfg)
    base = decoder.init_params(cfg, jax.random.PRNGKey(0))
    adapters, _ = lora.init_adapters(module, SETTINGS, jax.random.PRNGKey(1), mesh, rules)
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}  # fp32 master adapters
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, cfg.vocab_size)
    wrapped = lora.wrap(module, SETTINGS)

    def loss(params):
        out = wrapped.apply({"params": params}, ids)
        assert out.hidden_states.dtype == jnp.bfloat16  # the adapters run in the compute dtype
        return jnp.mean(out.logits ** 2)

    grads = jax.jit(jax.grad(lora.on_base(loss, cfg.compute_dtype)))(adapters, base)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)  # no gradient of the base exists
    # B starts at 0, so only B gets a gradient at first; every projection's B of every layer does
    names = [jax.tree_util.keystr(k) for k, g in jax.tree_util.tree_leaves_with_path(grads)
             if jax.tree_util.keystr(k).endswith("['kernel_lora_b']") and float(jnp.abs(g).max()) > 0]
    assert len(names) == 2 * 7, names


def _sft_overrides(mini_data, steps, export="merged"):
    return [f"--config.data.source={mini_data / 'data'}", f"--config.tokenizer={mini_data / 'tokenizer'}",
            f"--config.train.num_steps={steps}", "--config.train.log_every=1", "--config.train.eval_batches=1",
            "--config.data.max_length=64", "--config.checkpoint.save_every=3", "--config.checkpoint.keep=3",
            "--config.data.eval_batch_size=16", "--config.data.eval_split=", f"--config.lora.export={export}"]


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(workdir) if "loss" in r]


def test_sft_with_lora_learns_resumes_exactly_and_exports(mini_data, tmp_path):
    config_path = REPO / "configs" / "sft_lora_tiny.py"
    full = tmp_path / "full"
    argv = ["train", "--config", str(config_path), "--workdir", str(full)]
    assert cli.main(argv + _sft_overrides(mini_data, 6)) == 0
    losses = _losses(full)
    assert losses[-1][1] < losses[0][1]  # the adapters learn

    # the checkpoint holds only the adapters (and their moments)
    config = config_lib.load_config(config_path, _sft_overrides(mini_data, 6))
    mesh, rules = mesh_lib.make_mesh(config.mesh), mesh_lib.axis_rules(config.mesh)
    settings = loading.ModelSettings(hf_config=config.model.hf_config.to_dict())
    tok = tokenizer_lib.load_tokenizer(mini_data / "tokenizer")
    base = loading.load_policy(settings, mesh, rules, vocab_size=len(tok), special=loading.special_ids(tok),
                               rng=jax.random.split(jax.random.PRNGKey(config.seed))[0])
    lora_settings = lora.LoraSettings(rank=8, alpha=16.0)
    from jaxalign.train import checkpoint as checkpoint_lib, optim, state as state_lib
    abstract = state_lib.abstract_train_state(lora.adapter_init_fn(base.module, lora_settings),
                                              optim.make_optimizer(optim.OptimizerSettings(1e-3), 6), mesh, rules)
    ckpt = checkpoint_lib.Checkpointer(full / "checkpoints", checkpoint_lib.CheckpointSettings(), handle_signals=False)
    try:
        state, _ = ckpt.restore(6, abstract)
    finally:
        ckpt.close()
    adapters = state.params
    assert all(lora.is_adapter_path(tuple(getattr(k, "key", k) for k in path))
               for path, _ in jax.tree_util.tree_leaves_with_path(adapters))
    trained_bytes, base_bytes = lora.num_bytes(adapters), lora.num_bytes(base.params)
    print(f"tiny SFT: trained state {trained_bytes} B of adapters vs {base_bytes} B of base params")
    assert trained_bytes < base_bytes / 4

    # the merged export loads through load_policy and gives base + adapters' logits
    merged = loading.load_policy(loading.ModelSettings(init_path=str(full / "export")), mesh, rules,
                                 vocab_size=len(tok), rng=jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(5), (8, 12), 0, len(tok))
    wrapped = lora.wrap(base.module, lora_settings)
    with mesh_lib.sharding_context(mesh, rules):
        want = jax.jit(lambda b, a: wrapped.apply({"params": lora.combine(b, a)}, ids).logits)(base.params, adapters)
        got = jax.jit(lambda p: merged.module.apply({"params": p}, ids).logits)(merged.params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)

    # resume: the run cut back to its step-3 checkpoint, then the same command; adapters export this time
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for path in [resumed / "export", resumed / "checkpoints" / "6"]:
        shutil.rmtree(path)
    config = config_lib.load_config(config_path, _sft_overrides(mini_data, 6, export="adapters"))
    commands.train(config, resumed, allow_config_change=True)
    assert _losses(resumed) == losses  # bitwise
    stored_settings, stored = loading.load_lora_adapters(resumed / "export", base.cfg)
    assert stored_settings == lora_settings
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert (resumed / "export" / "tokenizer.json").exists()


def test_lora_critics_start_as_the_full_critics_and_train_only_adapters_and_head(tmp_path):
    """config.lora.critics: a fresh critic (B = 0, the scorer's head) gives the full critic's values; its
    update changes only its adapters and head, the frozen scorer stays bitwise; rl.frozen_param_dtype
    stores the frozen roles in bf16 while the trained ones stay fp32."""
    import conftest
    from configs import base
    from jaxalign.rl import algorithms, roles, rollout, steps
    from jaxalign.rl.settings import RLSettings
    from jaxalign.train import optim

    tok, cfg, _ = conftest.tiny_rl_inputs(tmp_path, rows=20)
    mesh, rules = _mesh()
    algorithm = algorithms.make("ppo_lag", has_cost_model=True)
    settings = RLSettings.from_group(base.get_config().rl)
    settings = dataclasses.replace(settings, prompt_length=6, max_new_tokens=6, ptx_coeff=0.0)
    model = loading.ModelSettings(init_path=str(tmp_path / "sft"))
    paths = roles.RolePaths(reward=str(tmp_path / "reward"), cost=str(tmp_path / "cost"))
    load = lambda **kw: roles.load_roles(algorithm.roles, model, paths, settings, tok, mesh, rules,  # noqa: E731
                                         jax.random.PRNGKey(0), SETTINGS, **kw)
    fns, params, shardings, _ = load(lora_critics=True)
    full_fns, full_params, _, _ = load()
    with pytest.raises(ValueError, match=r"config.rl.reward_critic_model_path=''"):  # a critic of its own is full
        roles.load_roles(algorithm.roles, model, dataclasses.replace(paths, reward_critic=paths.reward), settings,
                         tok, mesh, rules, jax.random.PRNGKey(0), SETTINGS, lora_critics=True)
    with pytest.raises(ValueError, match=r"config.lora.critics=True needs LoRA on: set config.lora.rank > 0"):
        roles.load_roles(algorithm.roles, model, paths, settings, tok, mesh, rules, jax.random.PRNGKey(0),
                         lora.LoraSettings(rank=0), lora_critics=True)
    assert fns.bases == {"actor": "reference", "reward_critic": "reward", "cost_critic": "cost"}
    assert full_fns.bases == {"actor": "reference"}
    critic = params["reward_critic"]
    assert set(critic) == {"model", "score_head"}
    assert all(lora.is_adapter_path(tuple(getattr(k, "key", k) for k in path))
               for path, _ in jax.tree_util.tree_leaves_with_path(critic["model"]))
    ids = jax.random.randint(jax.random.PRNGKey(5), (8, 12), 3, len(tok))
    mask = jnp.ones((8, 12), bool)
    values = jax.jit(lambda fn, p: fn(p, ids, mask), static_argnums=0)
    for role in ("reward_critic", "cost_critic"):
        paired = steps.role_params(fns, role, params[role], params)
        np.testing.assert_allclose(np.asarray(values(fns.scores[role], paired)),
                                   np.asarray(values(full_fns.scores[role], full_params[role])), atol=1e-6, rtol=0)

    # one update (a made-up experience): only the critics' adapters and heads move, the scorers stay bitwise
    trained = {name: params.pop(name) for name in steps.trained_roles(algorithm)}
    frozen = params
    frozen_before = jax.tree.map(np.array, frozen)
    constant = optim.OptimizerSettings(learning_rate=1e-2, lr_schedule="constant")
    tx, schedule = optim.make_optimizer(constant, 10), optim.make_schedule(constant, 10)
    optimizers = steps.Optimizers(tx, tx, schedule, schedule)
    state = steps.init_rl_state(algorithm, settings, trained, optimizers, jax.random.PRNGKey(1))
    before = jax.tree.map(np.array, state.critics)
    program = steps.compile_program(fns, algorithm, settings, optimizers, mesh, state, shardings,
                                    {name: shardings[name] for name in frozen})
    response = settings.max_new_tokens
    per_token = lambda value: {s: jnp.full((8, response), value) for s in algorithm.critics}  # noqa: E731
    exp = rollout.Experience(input_ids=ids, attention_mask=mask, response_mask=jnp.ones((8, response), bool),
                             old_log_probs=jnp.full((8, response), -1.0), ref_log_probs=jnp.full((8, response), -1.0),
                             advantages={s: jnp.ones((8, response)) for s in algorithm.streams},
                             values=per_token(0.0), returns=per_token(1.0))
    with mesh_lib.sharding_context(mesh, rules):
        state = jax.device_put(state, program.state_shardings)
        state, metrics = program.train(state, exp, jnp.float32(1.0), None, frozen)
    assert np.isfinite(float(metrics["reward_critic_loss"]))
    for stream in algorithm.critics:
        new, old = state.critics[stream].params, before[stream].params
        assert jax.tree.structure(new) == jax.tree.structure(old)  # adapters + head, nothing of the base
        assert np.abs(np.asarray(new["score_head"]["kernel"]) - old["score_head"]["kernel"]).max() > 0
        b = new["model"]["layers"]["mlp"]["down_proj"]["kernel_lora_b"]
        assert np.abs(np.asarray(b)).max() > 0  # B left 0
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(np.asarray(a), b)

    # rl.frozen_param_dtype: the frozen roles in bf16, the trained ones (adapters, critic heads) fp32
    fns16, params16, _, _ = load(lora_critics=True, frozen_param_dtype="bfloat16")
    dtypes = {role: {x.dtype for x in jax.tree.leaves(p)} for role, p in params16.items()}
    assert dtypes["reference"] == dtypes["reward"] == dtypes["cost"] == {jnp.dtype(jnp.bfloat16)}
    assert dtypes["actor"] == dtypes["reward_critic"] == {jnp.dtype(jnp.float32)}
    got = values(fns16.scores["reward_critic"], steps.role_params(fns16, "reward_critic", params16["reward_critic"],
                                                                  params16))
    np.testing.assert_allclose(np.asarray(got), np.asarray(values(full_fns.scores["reward_critic"],
                                                                  full_params["reward_critic"])), atol=0.05)


def test_ppo_lag_with_lora_actor_and_critics(tmp_path):
    """`jaxalign train --config configs/ppo_lag_lora_tiny.py` (LoRA actor and critics, frozen roles in bf16):
    two iterations; the reference stays the base, the checkpoint holds only adapters and the critics' heads,
    the resume from iteration 1 is exact, the export is the merged actor."""
    import conftest
    import orbax.checkpoint as ocp

    tok, cfg, params = conftest.tiny_rl_inputs(tmp_path, rows=150, policy_dir="sft")
    workdir = tmp_path / "run"
    argv = ["train", "--config", str(REPO / "configs" / "ppo_lag_lora_tiny.py"), "--workdir", str(workdir),
            f"--config.model.init_path={tmp_path / 'sft'}", f"--config.data.source={tmp_path / 'data'}",
            f"--config.rl.reward_model_path={tmp_path / 'reward'}", f"--config.rl.cost_model_path={tmp_path / 'cost'}",
            "--config.rl.prompt_length=40", "--config.rl.max_new_tokens=8", "--config.data.batch_size=8",
            "--config.train.num_steps=2", "--config.checkpoint.save_every=1", "--config.rl.ptx_coeff=0.5",
            "--config.rl.frozen_param_dtype=bfloat16"]
    assert cli.main(argv) == 0
    records = metrics_lib.read_metrics(workdir)
    record = records[0]
    for key in ("reward", "cost", "actor_loss", "ptx_loss", "reward_critic_loss", "cost_critic_loss", "kl_divergence"):
        assert np.isfinite(record[key]), key
    # the first rollout is scored before any update: the actor (B = 0) is its reference, the base
    assert abs(record["kl_divergence"]) < 1e-5
    assert record["logprob_gap_max"] < 1e-3  # the sampler (merged weights) and the scorer (base + adapters) agree

    # the checkpoint's trained params: the actor's adapters, each critic's adapters + score head
    metadata = ocp.StandardCheckpointer().metadata(workdir / "checkpoints" / "2" / "state")
    tree = getattr(metadata, "item_metadata", metadata)
    names = {"/".join(str(getattr(k, "key", k)) for k in path)
             for path, _ in jax.tree_util.tree_leaves_with_path(dict(tree))}
    params_names = [n for n in names if "/params/" in f"/{n}"]
    assert params_names and all(n.split("/")[-1] in lora.SUFFIXES or "/score_head/" in n for n in params_names), \
        sorted(params_names)
    assert any(n.startswith("critics/reward/params/score_head/") for n in params_names)

    # resume: the run cut back to its iteration-1 checkpoint, then the same command: the same metrics
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    for path in [resumed / "export", resumed / "checkpoints" / "2"]:
        shutil.rmtree(path)
    assert cli.main([*argv[:3], "--workdir", str(resumed), *argv[5:]]) == 0
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/") and "per_s" not in k}  # noqa: E731
    assert [strip(r) for r in metrics_lib.read_metrics(resumed)] == [strip(r) for r in records]

    _, exported = hf.from_pretrained(workdir / "export")
    # the actor learned: its merged projections moved, what LoRA does not touch (embeddings, norms) did not
    # (the base is stored in bf16: the export is the bf16 base merged)
    as_base = lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32)  # noqa: E731
    q = "model", "layers", "self_attn", "q_proj", "kernel"
    assert np.abs(_get(exported, q).astype(np.float32) - as_base(_get(params, q))).max() > 0
    embedding = "model", "embed_tokens", "embedding"
    np.testing.assert_array_equal(_get(exported, embedding).astype(np.float32), as_base(_get(params, embedding)))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)
