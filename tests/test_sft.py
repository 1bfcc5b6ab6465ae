"""SFT: the loss against numpy, and the stage end to end (CLI, export, exact resume)."""

import pathlib
import shutil

import jax
import numpy as np

from configs import base
from jaxalign import cli
from jaxalign import config as config_lib
from jaxalign.models import hf, loading
from jaxalign.models import tokenizer as tokenizer_lib
from jaxalign.objectives import sft
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.stages import commands
from jaxalign.train import metrics as metrics_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_sft_loss_matches_numpy_token_mean():
    rng = np.random.default_rng(0)
    B, T, V = 3, 7, 11
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    ids = rng.integers(0, V, size=(B, T))
    loss_mask = rng.random((B, T)) < 0.6
    loss_mask[2] = False  # a row without response tokens contributes nothing

    # independent reference: HF labels = ids with -100 outside the response, shifted by one
    labels = np.where(loss_mask, ids, -100)
    total, count, correct = 0.0, 0, 0
    for b in range(B):
        for t in range(T - 1):
            target = labels[b, t + 1]
            if target == -100:
                continue
            row = logits[b, t].astype(np.float64)
            log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
            total += log_z - row[target]
            count += 1
            correct += int(np.argmax(row) == target)
    loss, metrics = sft.sft_loss(logits, ids, loss_mask)
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), correct / count, rtol=1e-6)
    assert float(metrics["num_loss_tokens"]) == count


def test_next_token_log_probs_matches_numpy_and_leaves_the_last_slot_without_gradient():
    from jaxalign.objectives import common
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 9)).astype(np.float32) * 2
    ids = rng.integers(0, 9, size=(2, 5))
    got = np.asarray(common.next_token_log_probs(jnp.asarray(logits), jnp.asarray(ids)))
    x = logits.astype(np.float64)
    log_softmax = x - (np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) + x.max(-1, keepdims=True))
    expected = np.take_along_axis(log_softmax[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    assert got.shape == (2, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    weights = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    grad = jax.grad(lambda lg: jnp.sum(common.next_token_log_probs(lg, jnp.asarray(ids)) * weights))(jnp.asarray(logits))
    sliced = jax.grad(lambda lg: jnp.sum(common.token_log_probs(lg[:, :-1], jnp.asarray(ids)[:, 1:]) * weights))(
        jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(sliced), atol=1e-6)
    assert not np.asarray(grad)[:, -1].any()  # the last slot predicts nothing


def _overrides(mini_data, steps):
    return [
        f"--config.data.source={mini_data / 'data'}",
        f"--config.tokenizer={mini_data / 'tokenizer'}",
        f"--config.train.num_steps={steps}",
        "--config.train.log_every=1",
        "--config.train.eval_batches=1",
        "--config.train.grad_accum_steps=1",
        "--config.data.max_length=64",
        "--config.checkpoint.save_every=2",
        "--config.checkpoint.keep=3",
        "--config.data.eval_batch_size=16",
    ]


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(workdir) if "loss" in r]


def test_sft_stage_trains_exports_and_resumes_exactly(mini_data, tmp_path):
    # uninterrupted, through the CLI
    full = tmp_path / "full"
    argv = ["train", "--config", str(REPO / "configs" / "sft_tiny.py"), "--workdir", str(full)]
    assert cli.main(argv + _overrides(mini_data, 5)) == 0
    losses = _losses(full)
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5] and all(np.isfinite(l) for _, l in losses)
    records = metrics_lib.read_metrics(full)
    assert "eval/loss" in records[-1] and "accuracy" in records[0] and "tokens" in records[0]
    assert (full / "config.json").exists() and list((full / "tensorboard").iterdir())

    # the export is an HF directory with the trained weights and the tokenizer
    cfg, params = hf.from_pretrained(full / "export")
    assert (full / "export" / "tokenizer.json").exists()
    assert cfg.vocab_size == len(tokenizer_lib.load_tokenizer(full / "export"))
    tiny = config_lib.load_config(REPO / "configs" / "sft_tiny.py").model.hf_config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (tiny.num_hidden_layers, tiny.hidden_size)

    # the export loads back onto the 8-device mesh tensor by tensor; an added token's row = mean row
    mesh = mesh_lib.make_mesh(config_lib.load_config(REPO / "configs" / "sft_tiny.py").mesh)
    rules = mesh_lib.axis_rules(base.get_config().mesh)
    policy = loading.load_policy(loading.ModelSettings(init_path=str(full / "export")), mesh, rules,
                                 vocab_size=cfg.vocab_size + 1, rng=jax.random.PRNGKey(0))
    loaded, shardings = policy.params, policy.shardings
    table = loaded["model"]["embed_tokens"]["embedding"]
    assert policy.cfg.vocab_size == cfg.vocab_size + 1 and table.sharding == shardings["model"]["embed_tokens"]["embedding"]
    old_table = np.asarray(params["model"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(np.asarray(table)[:-1], old_table)
    np.testing.assert_allclose(np.asarray(table)[-1], old_table.mean(axis=0), rtol=1e-5, atol=1e-7)
    q_kernel = loaded["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q_kernel.addressable_shards[0].data.shape[1] == cfg.hidden_size // 8  # FSDP over 8 devices

    # resume: a copy of the run cut back to its step-2 checkpoint, then the same command again
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for path in [resumed / "export", resumed / "checkpoints" / "4", resumed / "checkpoints" / "5"]:
        shutil.rmtree(path)
    config = config_lib.load_config(
        REPO / "configs" / "sft_tiny.py", _overrides(mini_data, 5) + ["--config.data.eval_split="]
    )
    commands.train(config, resumed, allow_config_change=True)  # eval_split was turned off
    assert _losses(resumed) == losses  # bitwise, step for step: iterator, rng and optimizer restored
    _, resumed_params = hf.from_pretrained(resumed / "export")
    for a, b in zip(jax.tree.leaves(resumed_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_resume_at_an_epoch_boundary_and_after_the_last_step(mini_data, tmp_path, capsys):
    """A run stopped exactly at the end of epoch 1 and resumed for a second epoch logs the same losses
    as an uninterrupted 2-epoch run (the iterator's epoch and shuffle are restored); re-running the
    finished run says "already finished", trains nothing and does not rewrite the export."""
    def argv(workdir, epochs):
        overrides = [o for o in _overrides(mini_data, -1) if not o.startswith("--config.checkpoint.save_every")]
        return ["train", "--config", str(REPO / "configs" / "sft_tiny.py"), "--workdir", str(workdir), *overrides,
                f"--config.train.epochs={epochs}", "--config.data.batch_size=64", "--config.data.eval_split=",
                "--config.checkpoint.save_every=0",
                # a schedule that does not depend on the run's length, so 1 + 1 epochs == 2 epochs
                "--config.train.lr_schedule=constant", "--config.train.warmup_ratio=0.0"]

    assert cli.main(argv(tmp_path / "full", 2)) == 0
    full = _losses(tmp_path / "full")
    per_epoch = len(full) // 2
    assert len(full) == 2 * per_epoch and per_epoch >= 2
    assert cli.main(argv(tmp_path / "cut", 1)) == 0  # ends (and saves) exactly at the epoch boundary
    assert [s for s, _ in _losses(tmp_path / "cut")] == list(range(1, per_epoch + 1))
    assert cli.main(argv(tmp_path / "cut", 2)) == 0  # train.epochs may change on resume
    assert _losses(tmp_path / "cut") == full  # bitwise: epoch 2 reshuffled exactly as in one go
    export = tmp_path / "cut" / "export" / "model.safetensors"
    exported_at = export.stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(argv(tmp_path / "cut", 2)) == 0
    assert "already finished" in capsys.readouterr().err
    assert _losses(tmp_path / "cut") == full and export.stat().st_mtime_ns == exported_at
