"""sources.read_split: the TFDS-prepared ArrayRecord path gives the same rows, examples and batches
as the release files, reads only the records a process batches, and fails clearly."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxalign.data import mini, pipeline, sources, views, pku_saferlhf as pku

from jaxalign.data import prepared as prepared_lib
from jaxalign.models import tokenizer as tk

IDENTICAL = (3, 17, 40)  # rows of Alpaca-7B/train made identical pairs
INCONSISTENT = (5, 22)  # rows made safe-rlhf #181 pairs (safer labelled unsafe, the other safe)


def _write_rows(path: pathlib.Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> pathlib.Path:
    """The mini dataset with identical and #181 pairs added (duplicate prompts it has already)."""
    root = tmp_path_factory.mktemp("release")
    mini.write_mini(root, rows=240, seed=4)
    path = root / "data" / "Alpaca-7B" / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i in IDENTICAL:
        rows[i]["response_1"], rows[i]["response_1_sha256"] = rows[i]["response_0"], rows[i]["response_0_sha256"]
    for i in INCONSISTENT:
        rows[i]["is_response_0_safe"], rows[i]["is_response_1_safe"], rows[i]["safer_response_id"] = False, True, 0
    _write_rows(path, rows)
    return root


@pytest.fixture(scope="module")
def prepared(release, tmp_path_factory) -> pathlib.Path:
    data_dir = tmp_path_factory.mktemp("prepared")
    prepared_lib.prepare(release, data_dir, "default")
    prepared_lib.prepare(release, data_dir, "alpaca3-8b")
    return data_dir


@pytest.fixture(scope="module")
def tok_dir(release, tmp_path_factory):
    rows, _ = pku.read_release(release, "default", "train")
    texts = [t for r in rows for t in (r["prompt"], r["response_0"], r["response_1"])] + [views.PROMPT_TEMPLATE]
    out = tmp_path_factory.mktemp("tok")
    tk.train_bpe_tokenizer(texts, 600, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return tk.load_tokenizer(tok_dir)


def _mesh(n):
    return jax.make_mesh((1, n, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:n])


VIEWS = [
    ("sft", views.sft_examples, {}),
    ("sft", views.sft_examples, {"response": "safer"}),
    ("preference", views.preference_examples, {}),
    ("safety_preference", views.safety_preference_examples, {"inconsistent": "skip"}),
    ("safety_preference", views.safety_preference_examples, {"inconsistent": "keep"}),
    ("prompt", views.prompt_examples, {}),
    ("qa", views.qa_examples, {}),
]


def test_rows_and_report_identical(release, prepared):
    for name, split in [("default", "train"), ("default", "test"), ("alpaca3-8b", "train")]:
        want, want_report = sources.read_split(str(release), name, split)
        got, got_report = sources.read_split(str(release), name, split, prepared_dir=str(prepared))
        assert isinstance(got, prepared_lib.PreparedSplit) and len(got) == len(want)
        assert list(got) == want and got[7] == want[7] and got[-1] == want[-1] and got[2:5] == want[2:5]
        assert all(type(got[0][k]) is type(want[0][k]) for k in want[0])  # str/int/bool/dict as in the files
        assert got_report.to_dict() == want_report.to_dict()


@pytest.mark.parametrize("kind,view,kwargs", VIEWS, ids=[f"{v[1].__name__}-{v[2]}" for v in VIEWS])
def test_same_examples_and_batches(release, prepared, tok, kind, view, kwargs):
    rows, _ = sources.read_split(str(release), "default", "train")
    lazy_rows, _ = sources.read_split(str(release), "default", "train", prepared_dir=str(prepared))
    want, got = view(rows, **kwargs), view(lazy_rows, **kwargs)
    assert isinstance(got, views.LazyExamples) and got.kind == want.kind == kind
    assert dict(got.counts) == dict(want.counts)
    assert list(got) == list(want) and got[-1] == want[-1] and got[3:6] == want[3:6]
    for mesh in (None, _mesh(8)):
        kw = dict(batch_size=8, max_length=48, seed=5, mesh=mesh)
        a = pipeline.make_batches(kind, want, tok, **kw)
        b = pipeline.make_batches(kind, got, tok, **kw)
        for _ in range(4):
            x, y = next(a), next(b)
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def test_filters_were_exercised(release, prepared):
    """The fixture's identical, #181 and duplicate-prompt rows reach the lazy filters."""
    rows, _ = sources.read_split("", "default", "train", prepared_dir=str(prepared))
    assert views.preference_examples(rows).counts["skipped_identical"] == len(IDENTICAL)
    assert views.safety_preference_examples(rows, inconsistent="skip").counts["inconsistent_skipped"] >= 2
    assert views.prompt_examples(rows).counts["duplicates_removed"] > 0
    with pytest.raises(ValueError) as lazy_error:
        views.safety_preference_examples(rows, inconsistent="error")
    with pytest.raises(ValueError) as eager_error:
        views.safety_preference_examples(list(rows), inconsistent="error")
    assert str(lazy_error.value) == str(eager_error.value) and "#181" in str(lazy_error.value)


class _Counting:
    """Wraps a PreparedSplit's record source and records every index read."""

    def __init__(self, records):
        self.records, self.read = records, []

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.records[i]

    def __getitems__(self, indices):
        self.read.extend(int(i) for i in indices)
        return self.records.__getitems__(indices)


def test_a_process_reads_only_its_rows(prepared, tok):
    rows = prepared_lib.load_prepared(prepared, "default", "train")
    counter = rows._records = _Counting(rows._records)
    examples = views.preference_examples(rows)
    assert len(counter.read) <= 1  # the field check; the filters use the stored summary
    it = pipeline.make_batches("preference", examples, tok, batch_size=8, max_length=48, seed=1)
    # Simulate process 1 of 4: it holds rows [2, 4) of each global batch (pipeline.local_rows).
    it._rows = (2, 4)
    counter.read.clear()
    batch_indices = np.array([50, 9, 31, 77, 4, 60, 12, 88])
    arrays, _, n = it._local_batch(batch_indices)
    assert n == 8 and arrays["better_input_ids"].shape[0] == 2
    assert counter.read == [int(examples.row_ids[31]), int(examples.row_ids[77])]
    whole, _ = pipeline.tokenize_examples("preference", [examples[31], examples[77]], tok, max_length=48)
    np.testing.assert_array_equal(arrays["better_input_ids"], whole["better_input_ids"])


def test_summary_missing_is_recomputed(release, prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    for path in copy.rglob("row_summary-*.npz"):
        path.unlink()
    rows, _ = sources.read_split("", "default", "train", prepared_dir=str(copy))
    want, _ = sources.read_split(str(release), "default", "train")
    assert list(views.prompt_examples(rows)) == list(views.prompt_examples(want))
    assert list(views.preference_examples(rows)) == list(views.preference_examples(want))


def test_missing_config_or_split_names_dir_and_contents(prepared, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        sources.read_split("", "alpaca-7b", "train", prepared_dir=str(prepared))
    message = str(info.value)
    assert str(prepared) in message and "alpaca-7b" in message
    assert "default (train, test)" in message and "alpaca3-8b (train, test)" in message
    with pytest.raises(FileNotFoundError, match=r"has no split 'validation'.*default \(train, test\)"):
        sources.read_split("", "default", "validation", prepared_dir=str(prepared))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no prepared config"):
        sources.read_split("", "default", "train", prepared_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.read_split("", "default", "train", prepared_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown config"):
        sources.read_split("", "alpaca-13b", "train", prepared_dir=str(prepared))


def test_bad_split_name_rejected(release, prepared):
    for split in ("../x", "a/b", "", ".."):
        with pytest.raises(ValueError, match="split name"):
            sources.read_split(str(release), "default", split)
        with pytest.raises(ValueError, match="split name"):
            sources.read_split("", "default", split, prepared_dir=str(prepared))


def test_prepared_from_other_source_is_an_error(release, prepared, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(release, other)
    path = other / "data" / "Alpaca2-7B" / "test.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # one row fewer than what was prepared
    with pytest.raises(ValueError, match=r"other source files.*Alpaca2-7B/test.jsonl.*--overwrite"):
        sources.read_split(str(other), "default", "train", prepared_dir=str(prepared))
    rows, _ = sources.read_split("", "default", "train", prepared_dir=str(prepared))  # no source: no check
    assert len(rows) > 0


def test_release_path_needs_a_source():
    with pytest.raises(ValueError, match="no data"):
        sources.read_split("", "default", "train")


def test_real_rows_same_examples(shared_head_dir, tmp_path):
    prepared_lib.prepare(shared_head_dir, tmp_path, "alpaca-7b")
    rows, report = sources.read_split(str(shared_head_dir), "alpaca-7b", "test")
    lazy, lazy_report = sources.read_split(str(shared_head_dir), "alpaca-7b", "test", prepared_dir=str(tmp_path))
    assert list(lazy) == rows and lazy_report.to_dict() == report.to_dict()
    for _, view, kwargs in VIEWS:
        want, got = view(rows, **kwargs), view(lazy, **kwargs)
        assert list(got) == list(want) and dict(got.counts) == dict(want.counts)


_WORKER = """
import json, os, sys
import jax, numpy as np
process_id, port, prepared, tok_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
from jaxalign.data import pipeline, sources, views
from jaxalign.models import tokenizer as tk
rows, _ = sources.read_split("", "default", "train", prepared_dir=prepared)
records, read = rows._records, []
class Counting:
    def __len__(self): return len(records)
    def __getitem__(self, i): read.append(int(i)); return records[i]
    def __getitems__(self, keys): read.extend(int(k) for k in keys); return records.__getitems__(keys)
rows._records = Counting()
examples = views.preference_examples(rows)
mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
it = pipeline.make_batches("preference", examples, tk.load_tokenizer(tok_dir), batch_size=8, max_length=48,
                           seed=5, mesh=mesh)
local = {}
for step in range(3):
    batch = next(it)
    for key, value in batch.items():
        shards = sorted(value.addressable_shards, key=lambda s: s.index[0].start)
        local[f"{step}/{key}"] = np.concatenate([np.asarray(s.data) for s in shards])
        local[f"{step}/{key}/start"] = np.array(shards[0].index[0].start)
np.savez(out, **local)
json.dump(read, open(out + ".read.json", "w"))
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_read_only_their_rows(release, prepared, tok, tok_dir, tmp_path):
    """Two JAX processes (4 CPU devices each) batch a prepared split: each gets its half of the
    single-process global batches and reads only the records of its half."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), str(port), str(prepared), str(tok_dir),
                               str(tmp_path / f"p{i}.npz")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    rows, _ = sources.read_split("", "default", "train", prepared_dir=str(prepared))
    examples = views.preference_examples(rows)
    host = pipeline.make_batches("preference", examples, tok, batch_size=8, max_length=48, seed=5)
    expected = [next(host) for _ in range(3)]
    import grain

    order = grain.MapDataset.range(len(examples)).shuffle(seed=5)  # the pipeline's first-epoch order
    first_epoch = [int(order[i]) for i in range(len(examples))]
    halves = [set(), set()]
    for b in range(len(first_epoch) // 8):
        for j, index in enumerate(first_epoch[8 * b: 8 * b + 8]):
            halves[j // 4].add(int(examples.row_ids[index]))
    for i in (0, 1):
        got = np.load(tmp_path / f"p{i}.npz")
        for step, want in enumerate(expected):
            for key, value in want.items():
                assert int(got[f"{step}/{key}/start"]) == 4 * i
                np.testing.assert_array_equal(got[f"{step}/{key}"], value[4 * i: 4 * i + 4], err_msg=key)
        read = json.loads((tmp_path / f"p{i}.npz.read.json").read_text())
        assert set(read[1:]) <= halves[i] and not set(read[1:]) & halves[1 - i]  # read[0]: the field check
        assert 12 <= len(read) - 1 < len(examples) // 2
