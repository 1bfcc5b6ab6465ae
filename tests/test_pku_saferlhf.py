"""Schema, validation errors, reading and the TFDS ArrayRecord builder for PKU-SafeRLHF files."""

import copy
import json
import pathlib

import pytest

from jaxalign import cli
from jaxalign.data import commands, mini, pku_saferlhf as pku
from jaxalign.data import prepared as prepared_lib


def _write(path: pathlib.Path, rows: list, raw_lines: list[bytes] | None = None) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    if raw_lines:
        data += b"".join(raw_lines)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def good_rows():
    return mini.generate_rows(6, seed=5, noise=0.0)


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini_release")
    mini.write_mini(out, rows=120, seed=0)
    return out


def test_harm_categories_exact():
    assert len(pku.HARM_CATEGORIES) == 19
    assert pku.HARM_CATEGORIES[0] == "Endangering National Security"
    assert pku.HARM_CATEGORIES[-1] == "Animal Abuse"
    assert "White-Collar Crime" in pku.HARM_CATEGORIES and len(pku.DUAL_FIELDS) == 16


def test_real_rows(shared_head_dir, tmp_path):
    rows, report = pku.read_release(shared_head_dir, "alpaca-7b", "test", check_sha256=True)
    assert len(rows) == 141 and report.rows_kept == 141 and not report.skipped
    assert pku.detect_kind(shared_head_dir) == "dual"
    for r in rows:  # every sha256 of the release matches
        for i in (0, 1):
            assert r[f"response_{i}_sha256"] == pku.response_sha256(r["prompt"], r[f"response_{i}"])
    result = prepared_lib.prepare(shared_head_dir, tmp_path, "alpaca-7b")
    assert result["splits"] == {"test": 141}
    prepared = prepared_lib.load_prepared(tmp_path, "alpaca-7b", "test")
    assert len(prepared) == 141
    assert prepared[0] == rows[0] and prepared[140] == rows[140] and prepared[3:6] == rows[3:6]


def test_builder_on_generated_files(mini_dir, tmp_path):
    result = prepared_lib.prepare(mini_dir, tmp_path, "default")
    assert result["splits"] == {"train": 108, "test": 12}
    assert (pathlib.Path(result["path"]) / "validation_report.json").exists()
    train, _ = pku.read_release(mini_dir, "default", "train")
    prepared = prepared_lib.load_prepared(tmp_path, "default", "train")
    assert [prepared[i] for i in range(len(prepared))] == train  # file order kept
    assert list(prepared) == train
    assert list(prepared.examples[0]["response_0_harm_category"].shape) == [19]
    assert pku.example_to_row(prepared.examples[7]) == train[7]  # TFDS decoding agrees with the fast parse
    assert prepared.read([5, 2]) == [train[5], train[2]]
    sub = prepared_lib.prepare(mini_dir, tmp_path, "alpaca2-7b")
    assert sub["splits"] == {"train": 36, "test": 4}
    assert prepared_lib.load_prepared(tmp_path, "alpaca2-7b", "test")[0]["response_0_source"] == "Alpaca2-7B"
    with pytest.raises(FileNotFoundError, match="not prepared"):
        prepared_lib.load_prepared(tmp_path, "alpaca3-8b", "test")


def test_single_dimension_and_v0(good_rows, tmp_path):
    single = [{k: v for k, v in r.items() if k in pku.SINGLE_FIELDS} for r in good_rows]
    _write(tmp_path / "single" / "data" / "Alpaca-7B" / "train.jsonl", single)
    assert pku.detect_kind(tmp_path / "single") == "single"
    rows, _ = pku.read_release(tmp_path / "single", "single-alpaca-7b", "train")
    assert rows == single
    v0 = [{k: v for k, v in r.items() if k in pku.V0_FIELDS} for r in good_rows]
    _write(tmp_path / "v0" / "train.jsonl", v0)
    _write(tmp_path / "v0" / "test.jsonl", v0[:2])
    assert pku.detect_kind(tmp_path / "v0") == "v0"
    result = prepared_lib.prepare(tmp_path / "v0", tmp_path / "cache", "v0")
    assert result["kind"] == "v0" and result["splits"] == {"train": 6, "test": 2}
    assert prepared_lib.load_prepared(tmp_path / "cache", "v0", "test")[1] == v0[1]
    with pytest.raises(pku.DataError, match="missing_field|missing"):
        pku.read_release(tmp_path / "v0", "default", "train")  # v0 rows are not dual rows


def test_parquet(good_rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data" / "Alpaca3-8B"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(good_rows), folder / "train-00000-of-00001.parquet")
    rows, _ = pku.read_release(tmp_path, "alpaca3-8b", "train")
    assert rows == good_rows


def _mutations():
    def set_(field, value):
        return lambda r: r.__setitem__(field, value)

    def drop(field):
        return lambda r: r.pop(field)

    def cat(i, key, value):
        return lambda r: r[f"response_{i}_harm_category"].__setitem__(key, value)

    def delcat(i, key):
        return lambda r: r[f"response_{i}_harm_category"].pop(key)

    return [
        ("missing_field", "safer_response_id", drop("safer_response_id")),
        ("unexpected_field", "extra", set_("extra", 1)),
        ("wrong_type", "better_response_id", set_("better_response_id", True)),
        ("wrong_type", "response_1_severity_level", set_("response_1_severity_level", "2")),
        ("wrong_type", "prompt", set_("prompt", None)),
        ("wrong_type", "is_response_0_safe", set_("is_response_0_safe", 1)),
        ("bad_id", "safer_response_id", set_("safer_response_id", 2)),
        ("bad_severity", "response_0_severity_level", set_("response_0_severity_level", 4)),
        ("bad_severity", "response_1_severity_level", set_("response_1_severity_level", -1)),
        ("bad_categories", "response_0_harm_category", delcat(0, "Violence")),
        ("bad_categories", "response_1_harm_category", cat(1, "Arson", False)),
        ("bad_categories", "response_1_harm_category", cat(1, "Drugs", "yes")),
        ("sha256_mismatch", "response_1_sha256", set_("response_1_sha256", "0" * 64)),
    ]


@pytest.mark.parametrize("reason,field,mutate", _mutations(), ids=[f"{m[0]}-{m[1]}" for m in _mutations()])
def test_row_validation_errors(good_rows, tmp_path, reason, field, mutate):
    rows = copy.deepcopy(good_rows)
    mutate(rows[3])
    path = _write(tmp_path / "data" / "Alpaca-7B" / "train.jsonl", rows)
    with pytest.raises(pku.DataError) as info:
        pku.read_release(tmp_path, "alpaca-7b", "train")
    error = info.value
    assert (error.reason, error.field, error.line, error.path) == (reason, field, 4, str(path))
    assert f"{path}:4" in str(error) and repr(field) in str(error)
    kept, report = pku.read_release(tmp_path, "alpaca-7b", "train", strict=False)
    assert len(kept) == 5 and report.skipped == {reason: 1} and report.rows_read == 6


@pytest.mark.parametrize("reason,raw,line", [
    ("invalid_utf8", [b'{"prompt": "caf\xe9"}\n'], 7),
    ("blank_line", [b"\n", b"{}\n"], 7),
    ("bad_json", [b'{"prompt": oops}\n', b"{}\n"], 7),
    ("truncated_line", [b'{"prompt": "cut here'], 7),
])
def test_file_errors(good_rows, tmp_path, reason, raw, line):
    path = _write(tmp_path / "data" / "Alpaca-7B" / "test.jsonl", good_rows, raw)
    with pytest.raises(pku.DataError) as info:
        pku.read_release(tmp_path, "alpaca-7b", "test")
    assert info.value.reason == reason and info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_lenient_counts_every_reason(good_rows, tmp_path):
    rows = copy.deepcopy(good_rows)
    rows[0]["better_response_id"] = 5
    rows[1]["response_0_sha256"] = "x"
    _write(tmp_path / "data" / "Alpaca-7B" / "train.jsonl", rows, [b"\n", b"{bad\n", b'{"a": 1'])
    kept, report = pku.read_release(tmp_path, "alpaca-7b", "train", strict=False)
    assert len(kept) == 4 and report.rows_read == 9
    assert report.skipped == {"bad_id": 1, "sha256_mismatch": 1, "blank_line": 1, "bad_json": 1, "truncated_line": 1}
    kept, report = pku.read_release(tmp_path, "alpaca-7b", "train", strict=False, check_sha256=False)
    assert len(kept) == 5


def test_pair_stats_counts_inconsistent(good_rows):
    rows = copy.deepcopy(good_rows[:2])
    for r in rows:
        r["is_response_0_safe"], r["is_response_1_safe"] = False, True
    rows[0]["safer_response_id"] = 0  # labelled safer but unsafe, the other safe: #181
    rows[1]["safer_response_id"] = 1
    stats = commands.pair_stats(rows)
    assert stats["inconsistent_pairs"] == 1 and stats["pairs"]["one_safe"] == 2
    assert sum(stats["responses_per_severity"].values()) == 4


def test_cli(mini_dir, tmp_path, capsys):
    assert cli.main(["data", "validate", str(mini_dir)]) == 0
    assert "120/120 rows valid" in capsys.readouterr().out
    assert cli.main(["data", "stats", str(mini_dir), "--json", "--plot", str(tmp_path / "s.png")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["configs"]["alpaca-7b"]["train"]["rows"] == 36 and (tmp_path / "s.png").stat().st_size > 0
    assert cli.main(["data", "mini", "--out", str(tmp_path / "m"), "--rows", "30", "--seed", "1"]) == 0
    assert (tmp_path / "m" / "data" / "Alpaca3-8B" / "test.jsonl").exists()
    capsys.readouterr()
    assert cli.main(["data", "prepare", "--source", str(tmp_path / "m"), "--data-dir", str(tmp_path / "c")]) == 0
    assert json.loads(capsys.readouterr().out)["splits"] == {"train": 27, "test": 3}
    bad = tmp_path / "bad"
    _write(bad / "data" / "Alpaca-7B" / "train.jsonl", [], [b"{oops\n"])
    assert cli.main(["data", "validate", str(bad), "--config", "alpaca-7b"]) == 1
    assert "train.jsonl:1" in capsys.readouterr().err
    assert cli.main(["data", "validate", str(bad), "--config", "alpaca-7b", "--lenient"]) == 1
    assert "bad_json" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Stale prepare caches, mixed formats, kind detection, odd paths and rows


def _prepared_rows(data_dir, config="default", split="train"):
    return list(prepared_lib.load_prepared(data_dir, config, split))


def test_prepare_never_serves_a_stale_cache(tmp_path, capsys):
    source, cache = tmp_path / "src", tmp_path / "cache"
    mini.write_mini(source, rows=60, seed=0)
    assert prepared_lib.prepare(source, cache, "default")["cache"] == "new"
    assert prepared_lib.prepare(source, cache, "default")["cache"] == "reused"  # same files: reused
    mini.write_mini(source, rows=60, seed=1)  # the same files with other rows
    new_rows, _ = pku.read_release(source, "default", "train")
    assert _prepared_rows(cache) != new_rows
    with pytest.raises(ValueError) as info:
        prepared_lib.prepare(source, cache, "default")
    message = str(info.value)
    assert "pku_saferlhf/default/1.0.0" in message and "other source files" in message and "--overwrite" in message
    capsys.readouterr()
    assert cli.main(["data", "prepare", "--source", str(source), "--data-dir", str(cache)]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert _prepared_rows(cache) != new_rows  # refused: nothing changed
    assert cli.main(["data", "prepare", "--source", str(source), "--data-dir", str(cache), "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["cache"] == "rebuilt"
    assert _prepared_rows(cache) == new_rows
    # other validation options are another cache; a cache without a fingerprint is unknown
    with pytest.raises(ValueError, match="check_sha256=True, now check_sha256=False"):
        prepared_lib.prepare(source, cache, "default", check_sha256=False)
    next(pathlib.Path(cache).rglob(prepared_lib.FINGERPRINT_FILE)).unlink()
    with pytest.raises(ValueError, match="has no source_fingerprint.json.*--overwrite"):
        prepared_lib.prepare(source, cache, "default")
    assert prepared_lib.prepare(source, cache, "default", overwrite=True)["cache"] == "rebuilt"
    assert prepared_lib.prepare(source, cache, "default")["cache"] == "reused"


def test_mixed_formats_in_one_folder_is_an_error(good_rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data" / "Alpaca-7B"
    _write(folder / "test.jsonl", good_rows[:3])
    pq.write_table(pa.Table.from_pylist(good_rows[3:]), folder / "test-00000-of-00001.parquet")
    with pytest.raises(ValueError) as info:
        pku.read_release(tmp_path, "alpaca-7b", "test")
    assert str(info.value).startswith(f"{folder}: ")
    assert "test.jsonl" in str(info.value) and "test-00000-of-00001.parquet" in str(info.value)


def test_kind_from_the_nearest_fields_names_the_missing_field(good_rows, tmp_path, capsys):
    rows = copy.deepcopy(good_rows)
    del rows[0]["response_0_harm_category"]  # a dual row missing one field, first in the file
    path = _write(tmp_path / "data" / "Alpaca-7B" / "train.jsonl", rows)
    assert pku.detect_kind(tmp_path) == "dual"
    assert cli.main(["data", "validate", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:1: field 'response_0_harm_category': missing" in err
    assert "unexpected" not in err
    for kind, fields in pku.FIELDS.items():  # every kind's own fields, and with one field missing
        row = dict.fromkeys(fields)
        assert pku.kind_of_row(row) == kind
        row.pop(list(fields)[-1])
        assert pku.kind_of_row(row) == kind


def test_parquet_in_a_folder_with_brackets(good_rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "runs[1]*?"
    folder = root / "data" / "Alpaca-7B"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(good_rows), folder / "train-00000-of-00001.parquet")
    rows, _ = pku.read_release(root, "alpaca-7b", "train")
    assert rows == good_rows


def test_directory_named_like_a_data_file(good_rows, tmp_path, capsys):
    folder = tmp_path / "data" / "Alpaca-7B"
    (folder / "test.jsonl").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"test\.jsonl: is a directory; expected a JSON-lines file"):
        pku.read_release(tmp_path, "alpaca-7b", "test")
    assert cli.main(["data", "validate", str(tmp_path), "--config", "alpaca-7b"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a directory" in err
    (folder / "train-00000.parquet").mkdir()
    with pytest.raises(ValueError, match=r"train-00000\.parquet: is a directory; expected a parquet file"):
        pku.read_release(tmp_path, "alpaca-7b", "train")


def test_deeply_nested_json_is_a_located_error(good_rows, tmp_path):
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    path = _write(tmp_path / "data" / "Alpaca-7B" / "train.jsonl", good_rows, [deep])
    with pytest.raises(pku.DataError) as info:
        pku.read_release(tmp_path, "alpaca-7b", "train")
    assert str(info.value).startswith(f"{path}:7: ") and "nested too deeply" in str(info.value)
    kept, report = pku.read_release(tmp_path, "alpaca-7b", "train", strict=False)
    assert len(kept) == 6 and report.skipped == {"bad_json": 1}


def test_split_names_outside_the_folder_are_rejected(mini_dir, tmp_path):
    (mini_dir / "x.jsonl").write_text("")  # a file that `data/Alpaca-7B/../../x` would reach
    for split in ("../x", "../../x", "a/b", "..", "", "train/../test"):
        with pytest.raises(ValueError, match="split name"):
            pku.read_release(mini_dir, "alpaca-7b", split)
        with pytest.raises(ValueError, match="split name"):
            pku.find_files(mini_dir, "default", split)
    (mini_dir / "x.jsonl").unlink()
