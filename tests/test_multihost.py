"""Multi-host for real: two JAX processes on this machine (a localhost coordinator, 4 CPU devices
each) run `jaxalign train` for a tiny SFT and a tiny PPO-Lagrangian with config.mesh.distributed,
in two parts (the second resumes from the Orbax checkpoints the first saved across the two
processes), against one process with 8 devices running the same configs.

Checked: every process sees 2 processes and 8 global devices; each reads only its own half of every
global batch (the pipeline's example reads, recorded in the workers); the lambda step sees the
episode costs of both processes (the same window and the same J_C on both, equal to the 1-process
run's); the losses and RL metrics of every step, and the exported weights, equal the 1-process x
8-device run's.

Tolerance: both runs compute the same global arrays with the same mesh (fsdp=8) and shardings; only
the all-reduces differ (in-process vs gloo across processes), i.e. the order in which 8 fp32 partial
sums are added: a few ulps (~1e-7 relative) per reduction, grown by a handful of Adam steps and
GAE/whitening to < 1e-5 relative. A process reading the wrong rows, a double-counted or missing
shard, or a lost checkpoint leaf changes these numbers at the 1e-2 level, so rtol 1e-4 separates the
two by orders of magnitude; the sampled tokens (categorical draws with the same key) match exactly.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import conftest
from jaxalign import cli
from jaxalign.models import hf
from jaxalign.train import metrics as metrics_lib

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-4, 1e-6
RL_KEYS = ("reward", "cost", "lambda", "episode_cost", "kl_divergence", "actor_loss", "ptx_loss",
           "reward_critic_loss", "cost_critic_loss", "logprob_gap_max", "mean_generated_length")

# Runs `jaxalign train` for each argv of argv_list in one process of a 2-process JAX job, recording
# the example indices the data pipeline reads, the episode costs PPO-Lagrangian observes and the
# window means its lambda steps on.
_WORKER = r"""
import json, sys
process_id, port, out, argv_list = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
import jax
import numpy as np
from jaxalign import cli
from jaxalign.data import pipeline
from jaxalign.objectives import lagrange
from jaxalign.rl.algorithms import ppo_lag

record = {"reads": [], "observed": [], "means": []}
take, observe, cross_process_mean = pipeline._take, ppo_lag.PPOLagrangian.observe, lagrange.cross_process_mean

def recording_take(examples, indices):
    record["reads"][-1].append([int(i) for i in indices])
    return take(examples, indices)

def recording_observe(self, settings, state, scores):
    record["observed"][-1].append(np.asarray(scores["cost"]).tolist())
    return observe(self, settings, state, scores)

def recording_mean(value):
    result = cross_process_mean(value)
    record["means"][-1].append([float(np.asarray(value)), float(result)])
    return result

pipeline._take, lagrange.cross_process_mean = recording_take, recording_mean
ppo_lag.PPOLagrangian.observe = recording_observe
distributed = ["--config.mesh.distributed=True", f"--config.mesh.coordinator_address=localhost:{port}",
               "--config.mesh.num_processes=2", f"--config.mesh.process_id={process_id}"]
codes = []
for argv in argv_list:
    for key in record:
        record[key].append([])
    codes.append(cli.main(argv + distributed))
record.update(codes=codes, process_count=jax.process_count(), devices=jax.device_count(),
              local_devices=jax.local_device_count())
json.dump(record, open(out, "w"))
sys.exit(max(codes))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(argv_list: list[list[str]], out: pathlib.Path) -> list[dict]:
    """Runs the worker as processes 0 and 1 (4 CPU devices each) writing into `out`; -> (records, logs)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               JAXALIGN_DEBUG="1",  # a failure shows its traceback
               # part 2 reuses part 1's compiled programs
               JAX_COMPILATION_CACHE_DIR=str(out.parent / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), str(port), str(out / f"p{i}.json"),
                               json.dumps(argv_list)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    logs = []
    for p in procs:
        try:
            log, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(log)
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i}:\n{logs[i][-6000:]}"
    return [json.loads((out / f"p{i}.json").read_text()) for i in (0, 1)], logs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Mini data, a BPE tokenizer, a random tiny actor (with the tokenizer) and reward/cost models."""
    root = tmp_path_factory.mktemp("multihost")
    conftest.tiny_rl_inputs(root, rows=150, policy_dir="actor")
    return root


def _sft_argv(root, workdir, steps):
    return ["train", "--config", "configs/sft_tiny.py", "--workdir", str(workdir),
            f"--config.data.source={root / 'data'}", f"--config.tokenizer={root / 'tok'}",
            f"--config.train.num_steps={steps}", "--config.train.lr_schedule=constant", "--config.train.log_every=1",
            "--config.data.max_length=96", "--config.data.batch_size=8", "--config.data.eval_split=",
            "--config.checkpoint.save_every=1"]


def _ppo_argv(root, workdir, steps):
    return ["train", "--config", "configs/ppo_lag_tiny.py", "--workdir", str(workdir),
            f"--config.model.init_path={root / 'actor'}", f"--config.data.source={root / 'data'}",
            f"--config.rl.reward_model_path={root / 'reward'}", f"--config.rl.cost_model_path={root / 'cost'}",
            "--config.rl.prompt_length=40", "--config.rl.max_new_tokens=8", "--config.data.batch_size=8",
            f"--config.train.num_steps={steps}", "--config.train.lr_schedule=constant",
            "--config.train.warmup_ratio=0.0", "--config.rl.ppo_lag.episode_cost_window_size=16",
            "--config.rl.ppo_lag.lambda_lr=0.05", "--config.checkpoint.save_every=1",
            "--config.rl.eval_every=2", "--config.data.eval_split=test", "--config.rl.eval_prompts=8"]


def _half_of_a_batch(reads: list[list[int]], reference: list[list[int]], half: int) -> bool:
    """Every read of a process is exactly its half of one of the 1-process run's global batches."""
    halves = {tuple(batch[half * len(batch) // 2:(half + 1) * len(batch) // 2]) for batch in reference}
    return bool(reads) and all(tuple(r) in halves for r in reads)


def test_two_processes_train_sft_and_ppo_lag_like_one(inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    # The reference: one process, 8 devices (conftest), the runs in one go, its reads recorded.
    from jaxalign.data import pipeline

    reference_reads, take = [], pipeline._take

    def recording_take(examples, indices):
        reference_reads.append([int(i) for i in indices])
        return take(examples, indices)

    monkeypatch.setattr(pipeline, "_take", recording_take)
    assert cli.main(_sft_argv(inputs, tmp_path / "ref_sft", 3)) == 0
    assert cli.main(_ppo_argv(inputs, tmp_path / "ref_ppo", 2)) == 0
    monkeypatch.setattr(pipeline, "_take", take)

    # Two processes x 4 devices, in two parts: part 2 resumes from part 1's checkpoints.
    sft, ppo = tmp_path / "sft", tmp_path / "ppo"
    first, _ = _two_processes([_sft_argv(inputs, sft, 2), _ppo_argv(inputs, ppo, 1)], tmp_path / "part1")
    second, logs = _two_processes([_sft_argv(inputs, sft, 3), _ppo_argv(inputs, ppo, 2)], tmp_path / "part2")
    for record in first + second:
        assert record["codes"] == [0, 0]
        assert (record["process_count"], record["devices"], record["local_devices"]) == (2, 8, 4)
    assert "resumed from" in logs[0] and str(sft / "checkpoints") in logs[0]

    # Each process read only its half of the 1-process run's global batches (SFT, prompts, PTX).
    for records in (first, second):
        for process in (0, 1):
            for stage in (0, 1):
                assert _half_of_a_batch(records[process]["reads"][stage], reference_reads, process)

    # Orbax: both parts' checkpoints, written by both processes, restored by both.
    assert sorted(int(p.name) for p in (sft / "checkpoints").iterdir() if p.name.isdigit())[-1] == 3
    assert sorted(int(p.name) for p in (ppo / "checkpoints").iterdir() if p.name.isdigit())[-1] == 2

    # SFT losses, step by step, and the exported weights (process_allgather + process 0 writes).
    want = {r["step"]: r for r in metrics_lib.read_metrics(tmp_path / "ref_sft") if "loss" in r}
    got = {r["step"]: r for r in metrics_lib.read_metrics(sft) if "loss" in r}
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in want:
        np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=RTOL, atol=ATOL, err_msg=f"step {step}")
    _, want_params = hf.from_pretrained(tmp_path / "ref_sft" / "export")
    _, got_params = hf.from_pretrained(sft / "export")
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=1e-5)

    # PPO-Lagrangian: every iteration's metrics, lambda included.
    want = {r["step"]: r for r in metrics_lib.read_metrics(tmp_path / "ref_ppo") if "lambda" in r}
    got = {r["step"]: r for r in metrics_lib.read_metrics(ppo) if "lambda" in r}
    assert sorted(got) == sorted(want) == [1, 2]
    for step in want:
        for key in RL_KEYS:
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=RTOL, atol=1e-5,
                                       err_msg=f"{key} at step {step}")
    assert want[2]["lambda"] != want[1]["lambda"]  # lambda moved, so the comparison means something
    # The in-loop evaluation after the last iteration: rows sampled and scored on both hosts, gathered.
    want_eval, got_eval = ([r for r in metrics_lib.read_metrics(path) if "eval/reward" in r] for path in
                           (tmp_path / "ref_ppo", ppo))
    # (the 2-process run also evaluated at the end of its part 1, step 1)
    assert [r["step"] for r in got_eval] == [1, 2] and [r["step"] for r in want_eval] == [2]
    for key in ("eval/reward", "eval/cost", "eval/generated_length"):
        np.testing.assert_allclose(got_eval[1][key], want_eval[0][key], rtol=RTOL, atol=1e-5, err_msg=key)
    # rl.length_bucket (16 in ppo_lag_tiny): the used columns are read from a replicated reduction, the
    # same on every host (these prompts use all 40 columns, so nothing is trimmed).
    assert got[2]["sequence_length"] == want[2]["sequence_length"] == 40 + 8

    # The lambda window: both processes observe all 8 rollout costs (the same on both, and their
    # halves differ), so the window mean lambda steps on is the same everywhere and covers both hosts.
    for records in (first, second):
        observed = [r["observed"][1] for r in records]
        assert observed[0] == observed[1] and observed[0]
        for rows in observed[0]:
            assert len(rows) == 8
        means = [r["means"][1] for r in records]
        assert means[0] == means[1] and means[0]
    costs = np.asarray(first[0]["observed"][1][0])  # iteration 1's 8 episode costs
    assert not np.allclose(costs[:4], costs[4:])  # the two hosts' rows differ
    np.testing.assert_allclose(first[0]["means"][1][0][0], costs.mean(), rtol=1e-5)
    np.testing.assert_allclose(first[0]["means"][1][0][0], want[1]["episode_cost"], rtol=RTOL, atol=1e-5)
