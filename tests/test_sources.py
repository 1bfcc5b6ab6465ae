"""sources.read_split: the TFDS-prepared ArrayRecord path gives the same rows, examples and batches
as the release files, reads only the records a process batches, and fails clearly."""

import json
import pathlib

import jax
import numpy as np
import pytest

from jaxalign.data import mini, pipeline, sources, views, pku_saferlhf as pku
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
    pku.prepare(release, data_dir, "default")
    pku.prepare(release, data_dir, "alpaca3-8b")
    return data_dir


@pytest.fixture(scope="module")
def tok(release, tmp_path_factory):
    rows, _ = pku.read_release(release, "default", "train")
    texts = [t for r in rows for t in (r["prompt"], r["response_0"], r["response_1"])] + [views.PROMPT_TEMPLATE]
    return tk.train_bpe_tokenizer(texts, 600, tmp_path_factory.mktemp("tok"))


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
        assert isinstance(got, pku.PreparedSplit) and len(got) == len(want)
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
    rows = pku.load_prepared(prepared, "default", "train")
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
