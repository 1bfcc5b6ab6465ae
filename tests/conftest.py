"""Shared pytest setup: 8 simulated CPU devices (set before JAX initialises), shared data paths."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_HEAD = REPO_ROOT.parent / "shared" / "data" / "pku_saferlhf_head"


@pytest.fixture(scope="session")
def shared_head_dir() -> pathlib.Path:
    """The 141 real release rows beside the checkout; tests using it skip when absent."""
    if not (SHARED_HEAD / "data" / "Alpaca-7B" / "test.jsonl").exists():
        pytest.skip("../shared/data/pku_saferlhf_head is not present")
    return SHARED_HEAD
