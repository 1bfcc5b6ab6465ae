"""jaxalign.train.workdir.lock: one run per workdir; a killed holder never blocks the next run."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from jaxalign.train import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from jaxalign.train import workdir
with workdir.lock({path!r}):
    print("HELD", flush=True)
    time.sleep(600)
"""


def _start_holder(path):
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(repo=str(REPO), path=str(path)), "train", "--workdir", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline()
    assert line.strip() == "HELD", process.stderr.read()[-2000:]
    return process


def test_second_run_on_a_held_workdir_gets_one_clear_error(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(workdir_lib.WorkdirLockedError) as error:
            with workdir_lib.lock(tmp_path):
                pytest.fail("took a lock another process holds")
        message = str(error.value)
        assert "\n" not in message and str(tmp_path) in message and f"pid {holder.pid} " in message
        assert "--workdir" in message  # the holder's command line
        assert workdir_lib.read_holder(tmp_path)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_lock_file_of_a_killed_run_does_not_block(tmp_path):
    holder = _start_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the file and its holder record stay
    holder.wait()
    assert workdir_lib.read_holder(tmp_path)["pid"] == holder.pid
    with workdir_lib.lock(tmp_path) as file:
        assert file == tmp_path / ".lock"
        assert workdir_lib.read_holder(tmp_path)["pid"] == os.getpid()
    assert workdir_lib.read_holder(tmp_path) == {}  # released: no holder recorded


def test_lock_is_exclusive_within_one_process_and_reusable_after_release(tmp_path):
    workdir = tmp_path / "new" / "run"  # created on demand
    with workdir_lib.lock(workdir):
        with pytest.raises(workdir_lib.WorkdirLockedError, match=f"pid {os.getpid()} "):
            with workdir_lib.lock(workdir):
                pass
    with workdir_lib.lock(workdir):
        pass
    with workdir_lib.lock(workdir, enabled=False), workdir_lib.lock(workdir, enabled=False):
        pass  # other hosts of a multi-host run do not lock


def test_lock_is_released_when_the_body_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with workdir_lib.lock(tmp_path):
            raise RuntimeError("stage failed")
    start = time.time()
    with workdir_lib.lock(tmp_path):
        assert time.time() - start < 5


def test_train_command_refuses_a_held_workdir_before_touching_it(tmp_path, mini_data):
    from jaxalign import config as config_lib
    from jaxalign.stages import commands

    config = config_lib.load_config(REPO / "configs" / "sft_tiny.py", [
        f"--config.tokenizer={mini_data / 'tokenizer'}", f"--config.data.source={mini_data / 'data'}"])
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(workdir_lib.WorkdirLockedError, match=f"pid {holder.pid} "):
            commands.train(config, tmp_path)
        assert not (tmp_path / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
