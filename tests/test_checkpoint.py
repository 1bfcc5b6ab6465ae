"""Checkpoints and the loop: exact resume, preemption saves, NaN stops, partial saves ignored,
restore onto another mesh."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import checkpoint as checkpoint_lib
from jaxalign.train import loop, metrics as metrics_lib, optim, state as state_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


class TinyModel(nn.Module):
    """Two sharded dense layers: enough to check checkpoint mechanics quickly."""

    @nn.compact
    def __call__(self, x):
        w1 = self.param("w1", nn.with_logical_partitioning(nn.initializers.normal(0.3), ("embed", "mlp")), (8, 16))
        b1 = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (16,))
        w2 = self.param("w2", nn.with_logical_partitioning(nn.initializers.normal(0.3), ("mlp", "embed")), (16, 8))
        return jnp.tanh(x @ w1 + b1) @ w2


class Batches:
    """Deterministic batch i (a function of i only); `nan_at` makes that batch produce a NaN loss."""

    def __init__(self, mesh, nan_at=None):
        self.mesh, self.index, self.nan_at = mesh, 0, nan_at

    def __iter__(self):
        return self

    def __next__(self):
        self.index += 1
        rng = np.random.default_rng(self.index)
        x = rng.normal(size=(8, 8)).astype(np.float32)
        if self.nan_at == self.index:
            x[0, 0] = np.nan
        sharding = mesh_lib.batch_sharding(self.mesh)
        return {"x": jax.device_put(x, sharding), "attention_mask": jax.device_put(np.ones((8, 8), bool), sharding)}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def tiny_config(overrides=()):
    return config_lib.load_config(
        REPO / "configs" / "base.py",
        [
            "--config.train.num_steps=8",
            "--config.train.grad_accum_steps=2",
            "--config.train.learning_rate=1e-2",
            "--config.train.warmup_ratio=0.25",
            "--config.train.log_every=1",
            "--config.checkpoint.save_every=2",
            "--config.checkpoint.keep=2",
            *overrides,
        ],
    )


def run_tiny(workdir, config, batches=None, devices=None, checkpointer=None, tx=None):
    mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
    rules = mesh_lib.axis_rules(config.mesh)
    model = TinyModel()
    num_steps = config.train.num_steps
    tx = tx or optim.make_optimizer(config.train, num_steps)
    init_params = lambda r: model.init(r, jnp.zeros((1, 8)))["params"]  # noqa: E731
    abstract = state_lib.abstract_train_state(init_params, tx, mesh, rules)

    def init_state():
        params, _ = mesh_lib.init_sharded(init_params, jax.random.PRNGKey(config.seed), mesh, rules)
        return state_lib.init_train_state(params, tx, jax.random.PRNGKey(1), abstract)

    def loss_fn(params, batch, rng, extra):
        y = model.apply({"params": params}, batch["x"])
        noise = jax.random.normal(rng, y.shape) * 1e-3  # the per-step rng must be restored too
        loss = jnp.mean((y + noise - jnp.roll(batch["x"], 1, axis=-1)) ** 2)
        return loss, ({"y_mean": jnp.mean(y)}, extra)

    settings = loop.LoopSettings(
        num_steps=num_steps, log_every=int(config.train.log_every), grad_accum_steps=int(config.train.grad_accum_steps),
        checkpoint=checkpoint_lib.CheckpointSettings(**config.checkpoint.to_dict()))
    result = loop.train(
        settings=settings, workdir=workdir, mesh=mesh, rules=rules, tx=tx, loss_fn=loss_fn,
        abstract_state=abstract, init_state=init_state, train_iter=batches or Batches(mesh),
        schedule=optim.make_schedule(config.train, num_steps), checkpointer=checkpointer,
    )
    return result.state, mesh, rules, abstract


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(workdir) if "loss" in r]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config()
    mesh = mesh_lib.make_mesh(config.mesh)
    with pytest.raises(loop.NonFiniteError, match=r"non-finite .*loss=nan.* at step 5.*last good checkpoint is step 4"):
        run_tiny(tmp_path, config, batches=Batches(mesh, nan_at=10))
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", config.checkpoint, False)
    assert checkpointer.latest_step() == 4
    _, data_state = checkpointer.restore(4, run_tiny_abstract(config))
    assert data_state["iterator"] == {"index": 8}


def test_a_poisoned_update_is_never_saved(tmp_path):
    """A NaN learning rate gives a finite loss and gradient at step 1 but NaN parameters after the
    update: the loop checks the parameter norm after the update, so no checkpoint holds them."""
    import optax

    config = tiny_config(["--config.checkpoint.save_every=1"])
    with pytest.raises(loop.NonFiniteError, match=r"non-finite param_norm=nan at step 1"):
        run_tiny(tmp_path, config, tx=optax.sgd(float("nan")))
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", config.checkpoint, False)
    assert checkpointer.latest_step() is None


def run_tiny_abstract(config, devices=None):
    mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
    rules = mesh_lib.axis_rules(config.mesh)
    model = TinyModel()
    tx = optim.make_optimizer(config.train, config.train.num_steps)
    return state_lib.abstract_train_state(lambda r: model.init(r, jnp.zeros((1, 8)))["params"], tx, mesh, rules)


def test_restore_onto_another_mesh_and_skip_partial_saves(tmp_path):
    config = tiny_config(["--config.mesh.fsdp=8", "--config.train.num_steps=2"])
    state, *_ = run_tiny(tmp_path, config)
    assert state.params["w1"].addressable_shards[0].data.shape == (1, 16)  # [8, 16] over fsdp=8

    # a save cut off mid-write: Orbax's tmp dir for step 3, never renamed into place
    partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 16)

    other = tiny_config(["--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.train.num_steps=2"])
    abstract = run_tiny_abstract(other, devices=jax.devices()[:4])
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", other.checkpoint, False)
    assert checkpointer.latest_step() == 2 and checkpointer.all_steps() == [2]  # the partial save is skipped
    restored, _ = checkpointer.restore(None, abstract)
    checkpointer.close()
    w1 = restored.params["w1"]
    assert len(w1.sharding.device_set) == 4 and w1.addressable_shards[0].data.shape == (4, 8)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


_SIGTERM_SCRIPT = """
import sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
import test_checkpoint as t
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import loop

class Slow(t.Batches):
    def __next__(self):
        time.sleep(0.2)
        return super().__next__()

config = t.tiny_config()
try:
    t.run_tiny({workdir!r}, config, batches=Slow(mesh_lib.make_mesh(config.mesh)))
except loop.Preempted as stop:
    print("PREEMPTED", stop.step, flush=True)
    sys.exit(143)
"""


def test_sigterm_saves_and_the_resumed_run_logs_the_same_losses(tmp_path):
    """A run killed by SIGTERM saves its last update; rerunning continues bitwise-identically."""
    config = tiny_config()
    full_state, *_ = run_tiny(tmp_path / "full", config)
    assert [s for s, _ in _losses(tmp_path / "full")] == list(range(1, 9))

    workdir = tmp_path / "cut"
    script = tmp_path / "train.py"
    script.write_text(_SIGTERM_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), workdir=str(workdir)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    process = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while len(metrics_lib.read_metrics(workdir)) < 2:
        assert process.poll() is None, process.communicate()[1].decode()[-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 143, err.decode()[-3000:]
    stopped_at = int(out.decode().split("PREEMPTED")[1].split()[0])
    assert 2 <= stopped_at < 8
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", config.checkpoint, False)
    assert checkpointer.latest_step() == stopped_at  # the preemption save (periodic ones are every 2)

    resumed_state, *_ = run_tiny(workdir, config)  # the same command again
    assert _losses(workdir) == _losses(tmp_path / "full")  # bitwise, step for step
    for a, b in zip(jax.tree.leaves(resumed_state), jax.tree.leaves(full_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- integrity: corrupted or truncated checkpoint files -----------------------------------------


class _Settings:
    def __init__(self, async_save=True, keep=3):
        self.save_every, self.keep, self.async_save = 1, keep, async_save


def _tree(seed):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(64, 64)).astype(np.float32)), "b": jnp.asarray(rng.normal(size=(16,)))}


def _abstract():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), _tree(0))


def _save_steps(directory, steps, async_save=True):
    checkpointer = checkpoint_lib.Checkpointer(directory, _Settings(async_save), handle_signals=False)
    for step in steps:
        checkpointer.save(step, _tree(step), {"iterator": {"index": step}})
    checkpointer.close()


def _largest_data_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _flip(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["flipped-bytes", "truncated"])
@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, caplog, damage, async_save):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [2, 4], async_save)
    assert (directory / "4" / checkpoint_lib.MANIFEST_NAME).exists()
    damaged = _largest_data_file(directory / "4")
    damage(damaged)

    checkpointer = checkpoint_lib.Checkpointer(directory, _Settings(), handle_signals=False)
    with caplog.at_level("WARNING"):
        assert checkpointer.latest_step() == 2
    assert f"checkpoint step 4 in {directory} is corrupted: {damaged}" in caplog.text
    assert "using step 2 instead" in caplog.text
    state, data_state = checkpointer.restore(None, _abstract())
    _assert_tree_equal(state, _tree(2))
    assert data_state == {"iterator": {"index": 2}}
    with pytest.raises(checkpoint_lib.CheckpointCorruptError, match=f"step 4 in {directory} is corrupted"):
        checkpointer.restore(4, _abstract())

    # training on from step 2 saves step 4 again: the corrupted one is replaced, not kept
    checkpointer.save(4, _tree(40), {"iterator": {"index": 40}})
    checkpointer.close()
    checkpointer = checkpoint_lib.Checkpointer(directory, _Settings(), handle_signals=False)
    assert checkpointer.latest_step() == 4
    _assert_tree_equal(checkpointer.restore(4, _abstract())[0], _tree(40))
    checkpointer.close()


def test_no_intact_step_is_one_clear_error(tmp_path):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [1, 2])
    _flip(_largest_data_file(directory / "2"))
    _truncate(_largest_data_file(directory / "1"))
    checkpointer = checkpoint_lib.Checkpointer(directory, _Settings(), handle_signals=False)
    with pytest.raises(checkpoint_lib.CheckpointCorruptError) as error:
        checkpointer.latest_step()
    message = str(error.value)
    assert "\n" not in message and f"no intact checkpoint in {directory}" in message
    assert "step 2: " in message and "step 1: " in message and "truncated" in message
    checkpointer.close()


def test_unverifiable_truncated_step_is_one_line_not_a_traceback(tmp_path):
    """A step without a manifest (the run died before writing it) is used unverified; if it turns
    out unreadable, restore names the step in one line."""
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [3])
    (directory / "3" / checkpoint_lib.MANIFEST_NAME).unlink()
    _truncate(_largest_data_file(directory / "3"))
    checkpointer = checkpoint_lib.Checkpointer(directory, _Settings(), handle_signals=False)
    assert checkpointer.latest_step() == 3
    with pytest.raises(checkpoint_lib.CheckpointError) as error:
        checkpointer.restore(3, _abstract())
    assert str(error.value).startswith(f"could not restore checkpoint step 3 from {directory}: ")
    assert "\n" not in str(error.value)
    checkpointer.close()


def test_manifest_covers_every_file_and_verifies(tmp_path):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [5])
    manifest = json.loads((directory / "5" / checkpoint_lib.MANIFEST_NAME).read_text())["files"]
    on_disk = {str(p.relative_to(directory / "5")) for p in (directory / "5").rglob("*")
               if p.is_file() and p.name != checkpoint_lib.MANIFEST_NAME}
    assert set(manifest) == on_disk and any(name.startswith("state/") for name in manifest)
    assert checkpoint_lib.verify_step(directory / "5") == (True, "")
