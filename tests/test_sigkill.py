"""A real SIGKILL, twice per run: `jaxalign train` subprocesses killed at seeded random points:
SFT during a step and inside the export of the run extended from 3 to 6 steps (its step-3 export
must survive); PPO-Lagrangian right after a checkpoint save started (Orbax writes it in a
background thread) and inside its export. Inside the export means the weights written but not the
tokenizer, or the weights half written (chosen at random). The hooks that say when a save or the
export is under way live in the wrapper script below, not in jaxalign. After every kill the
workdir's export is absent or complete (never torn), and the final resume logs the uninterrupted
run's metrics bit for bit and exports the same bytes.

Cost: 7 `jaxalign train` processes and 2 in-process reference runs; a persistent compilation cache
shared by the processes of one run keeps each later start to its imports (times: docs/reliability.md)."""

import hashlib
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

import conftest
from jaxalign import config as config_lib
from jaxalign.models import hf, loading
from jaxalign.stages import commands, common
from jaxalign.train import metrics as metrics_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

_WRAPPER = """
import os, sys, time

hook, marker = os.environ["KILL_HOOK"], os.environ["KILL_MARKER"]


def mark(text):
    with open(marker, "a") as f:
        f.write(text + "\\n")


if hook == "save":
    from jaxalign.train import checkpoint

    save = checkpoint.Checkpointer.save

    def saving(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        mark(f"save {step}")  # Orbax is writing it in the background now

    checkpoint.Checkpointer.save = saving
elif hook.startswith("export"):
    from jaxalign.models import hf

    write = hf.save_file

    def writing(tensors, filename, metadata=None):
        write(tensors, filename, metadata=metadata)
        if hook == "export-half":
            os.truncate(filename, os.path.getsize(filename) // 2)
        mark("export")
        time.sleep(600)  # the tokenizer files are not written yet

    hf.save_file = writing
from jaxalign import cli

sys.exit(cli.main(sys.argv[1:]))
"""


def _deterministic(records):
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k and k != "tok_s"} for r in records]


def _sha(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


class _Runs:
    """Starts `jaxalign train` in subprocesses and kills them at the moments asked for."""

    def __init__(self, tmp_path, argv, seed):
        self.argv, self.rng = argv, random.Random(seed)
        self.script = tmp_path / "train_and_wait.py"
        self.script.write_text(_WRAPPER)
        self.marker, self.log = tmp_path / "events.txt", tmp_path / "train.log"
        self.env = dict(os.environ, PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAXALIGN_DEBUG="")
        self.workdir = pathlib.Path(argv[argv.index("--workdir") + 1])

    def _start(self, hook, overrides):
        self.marker.write_text("")
        with open(self.log, "w") as log:  # a file, not a pipe: a full pipe would stall the child
            return subprocess.Popen([sys.executable, str(self.script), *self.argv, *overrides], cwd=REPO,
                                    env=dict(self.env, KILL_HOOK=hook, KILL_MARKER=str(self.marker)),
                                    stdout=subprocess.DEVNULL, stderr=log)

    def _wait_for(self, process, ready):
        deadline = time.time() + 400
        while not ready():
            assert process.poll() is None, self.log.read_text()[-3000:]
            assert time.time() < deadline, "the moment to kill never came"
            time.sleep(0.01)

    def _kill(self, process):
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL
        export = self.workdir / "export"
        assert not export.exists() or loading.check_export(export) == ""  # never a torn export

    def kill_during_step(self, num_steps, overrides=()):
        done = len(metrics_lib.read_metrics(self.workdir)) if (self.workdir / "metrics.jsonl").exists() else 0
        target = self.rng.randint(done + 1, num_steps - 1)
        process = self._start("", overrides)
        self._wait_for(process, lambda: (self.workdir / "metrics.jsonl").exists()
                       and len(metrics_lib.read_metrics(self.workdir)) >= target)
        time.sleep(self.rng.uniform(0.0, 0.3))
        self._kill(process)

    def kill_during_save(self, overrides=()):
        process = self._start("save", overrides)
        self._wait_for(process, lambda: "save" in self.marker.read_text())
        time.sleep(self.rng.uniform(0.0, 0.05))
        self._kill(process)

    def kill_during_export(self, overrides=()):
        process = self._start(self.rng.choice(["export-weights", "export-half"]), overrides)
        self._wait_for(process, lambda: "export" in self.marker.read_text())
        self._kill(process)

    def finish(self, overrides=()):
        process = self._start("", overrides)
        assert process.wait(timeout=600) == 0, self.log.read_text()[-3000:]


def _check_same_run(workdir, reference):
    assert _deterministic(metrics_lib.read_metrics(workdir)) == _deterministic(metrics_lib.read_metrics(reference))
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert _sha(workdir / "export" / name) == _sha(reference / "export" / name), name
    hf.from_pretrained(workdir / "export")
    assert loading.check_export(workdir / "export") == ""
    assert not [p.name for p in workdir.iterdir() if p.name.startswith(".export")]


@pytest.mark.slow
def test_sft_killed_in_a_step_and_its_export_keeps_the_previous_export_and_resumes_bit_exactly(mini_data, tmp_path):
    argv = ["train", "--config", "configs/sft_tiny.py", "--workdir", str(tmp_path / "run"),
            f"--config.data.source={mini_data / 'data'}", f"--config.tokenizer={mini_data / 'tokenizer'}",
            "--config.data.max_length=96", "--config.data.batch_size=8", "--config.data.eval_split=",
            "--config.train.lr_schedule=constant", "--config.train.warmup_ratio=0", "--config.train.log_every=1",
            "--config.checkpoint.save_every=1", "--config.checkpoint.keep=2",
            "--config.model.hf_config.hidden_size=32", "--config.model.hf_config.intermediate_size=64",
            "--config.model.hf_config.num_hidden_layers=1"]
    reference = tmp_path / "reference"
    commands.train(config_lib.load_config(REPO / "configs" / "sft_tiny.py", argv[5:] + ["--config.train.num_steps=6"]),
                   reference)
    runs = _Runs(tmp_path, argv, seed=0)
    short, full = ["--config.train.num_steps=3"], ["--config.train.num_steps=6"]
    runs.finish(short)  # a finished 3-step run and its export
    export = runs.workdir / "export"
    previous = {p.name: _sha(p) for p in export.iterdir()}
    assert json.loads((export / common.EXPORT_STEP_NAME).read_text())["step"] == 3
    runs.kill_during_step(6, full)  # extended to 6 steps (a constant learning rate: the same run)
    runs.kill_during_export(full)
    assert {p.name: _sha(p) for p in export.iterdir()} == previous  # the step-3 export survived
    runs.finish(full)
    _check_same_run(runs.workdir, reference)


@pytest.mark.slow
def test_ppo_lag_killed_in_a_save_and_its_export_resumes_bit_exactly(tmp_path):
    conftest.tiny_rl_inputs(tmp_path, rows=60)
    config_args = [f"--config.model.init_path={tmp_path / 'sft'}", f"--config.data.source={tmp_path / 'data'}",
                   f"--config.rl.reward_model_path={tmp_path / 'reward'}",
                   f"--config.rl.cost_model_path={tmp_path / 'cost'}", "--config.rl.prompt_length=40",
                   "--config.rl.max_new_tokens=8", "--config.data.batch_size=8", "--config.train.num_steps=5",
                   "--config.checkpoint.save_every=1", "--config.checkpoint.keep=2"]
    reference = tmp_path / "reference"
    commands.train(config_lib.load_config(REPO / "configs" / "ppo_lag_tiny.py", config_args), reference)
    runs = _Runs(tmp_path, ["train", "--config", "configs/ppo_lag_tiny.py", "--workdir", str(tmp_path / "run"),
                            *config_args], seed=1)
    runs.kill_during_save()
    runs.kill_during_export()
    runs.finish()
    _check_same_run(runs.workdir, reference)
