"""The generated mini dataset: release layout, valid schema, labels consistent by construction."""

import pathlib
from collections import Counter

import pytest

from jaxalign.data import mini, pku_saferlhf as pku


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("mini")
    mini.write_mini(out, rows=900, seed=3, noise=0.0)
    return out


def test_layout_and_counts(mini_dir):
    for subset in pku.SUBSET_DIRS.values():
        for split, n in (("train", 270), ("test", 30)):
            lines = (mini_dir / "data" / subset / f"{split}.jsonl").read_text().splitlines()
            assert len(lines) == n


def test_rows_validate_with_sha256(mini_dir):
    rows, report = pku.read_release(mini_dir, "default", "train", strict=True, check_sha256=True)
    assert len(rows) == 810 and report.rows_kept == 810 and not report.skipped
    assert {r["response_0_source"] for r in rows} == set(pku.SUBSET_DIRS.values())


def test_deterministic_from_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    mini.write_mini(a, rows=60, seed=1)
    mini.write_mini(b, rows=60, seed=1)
    mini.write_mini(c, rows=60, seed=2)
    path = pathlib.Path("data/Alpaca2-7B/train.jsonl")
    assert (a / path).read_bytes() == (b / path).read_bytes()
    assert (a / path).read_bytes() != (c / path).read_bytes()


def test_labels_consistent_by_construction(mini_dir):
    rows, _ = pku.read_release(mini_dir, "default", "train")
    for r in rows:
        for i in (0, 1):
            safe = r[f"is_response_{i}_safe"]
            severity = r[f"response_{i}_severity_level"]
            flagged = any(r[f"response_{i}_harm_category"].values())
            assert safe == (severity == 0) == (not flagged)
        s = r["safer_response_id"]
        assert r[f"response_{s}_severity_level"] <= r[f"response_{1 - s}_severity_level"]
    categories = Counter(name for r in rows for i in (0, 1)
                         for name, flag in r[f"response_{i}_harm_category"].items() if flag)
    assert set(categories) == set(pku.HARM_CATEGORIES)
    severities = Counter(r[f"response_{i}_severity_level"] for r in rows for i in (0, 1))
    assert all(severities[k] > 0 for k in range(4))
    assert any(r["prompt"].endswith(("?", ".")) and "Sure! " in r["response_0"] + r["response_1"] for r in rows)


def test_reward_cost_tradeoff(mini_dir):
    """On pairs with one safe and one unsafe answer, the more helpful answer is mostly the unsafe one."""
    rows, _ = pku.read_release(mini_dir, "default", "train")
    mixed = [r for r in rows if r["is_response_0_safe"] != r["is_response_1_safe"]]
    better_unsafe = sum(not r[f"is_response_{r['better_response_id']}_safe"] for r in mixed)
    assert len(mixed) > 100 and better_unsafe / len(mixed) > 0.6


def test_label_noise_flips_ids():
    clean = mini.generate_rows(2000, seed=0, noise=0.0)
    noisy = mini.generate_rows(2000, seed=0, noise=0.2)
    inconsistent = sum(not r[f"is_response_{r['safer_response_id']}_safe"]
                       and r[f"is_response_{1 - r['safer_response_id']}_safe"] for r in noisy)
    assert inconsistent > 0
    assert not any(not r[f"is_response_{r['safer_response_id']}_safe"]
                   and r[f"is_response_{1 - r['safer_response_id']}_safe"] for r in clean)
    for r in noisy:
        pku.validate_row(r)
