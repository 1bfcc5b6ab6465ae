"""jaxalign/files.py: atomic outputs (a crash never leaves a torn or missing output), refused
overwrites, sha256 manifests and input fingerprints."""

import json
import os
import subprocess
import sys
import time

import pytest

from jaxalign import files


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_failed_body_leaves_the_previous_dir_whole_and_no_temporary(tmp_path):
    out = tmp_path / "export"
    with files.atomic_dir(out) as tmp:
        (tmp / "weights").write_bytes(b"old weights")
        (tmp / "tokenizer.json").write_text("{}")
    before = _tree(out)
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "weights").write_bytes(b"new wei")  # cut off before the tokenizer
            raise KeyboardInterrupt
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with files.atomic_dir(out, overwrite=True, manifest=True) as tmp:
        (tmp / "weights").write_bytes(b"new weights")
    assert set(_tree(out)) == {"weights", files.MANIFEST_NAME}  # replaced as a whole
    assert files.verify_manifest(out) == (True, "")


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "rows.jsonl"
    out.write_text("good\n")
    with pytest.raises(RuntimeError):
        with files.atomic_file(out, overwrite=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert out.read_text() == "good\n" and sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
    files.write_text(out, "new\n")
    assert out.read_text() == "new\n"


def test_a_swap_cut_between_its_two_renames_is_put_back(tmp_path):
    """Killed after the old dir was moved aside and before the new one was renamed in: the next
    reader finds the old one in place, and stale temporaries of dead processes are removed."""
    out = tmp_path / "export"
    out.mkdir()
    (out / "weights").write_bytes(b"good")
    pid = _dead_pid()
    os.replace(out, tmp_path / f".export.old-{pid}")
    (tmp_path / f".export.tmp-{pid}").mkdir()
    (tmp_path / f".export.tmp-{pid}" / "weights").write_bytes(b"go")
    files.recover(out)
    assert (out / "weights").read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    live = tmp_path / f".export.tmp-{os.getppid()}"  # a live writer's temporary is left alone
    live.mkdir()
    files.recover(out)
    assert live.exists()


def test_an_existing_output_is_refused_unless_overwrite(tmp_path):
    taken = tmp_path / "taken.jsonl"
    taken.write_text("someone's rows\n")
    with pytest.raises(files.OutputExistsError, match=r"--output .*taken.jsonl already exists \(a file\); pass --overwrite"):
        with files.atomic_file(taken, flag="--output") as tmp:
            tmp.write_text("x")
    assert taken.read_text() == "someone's rows\n"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(files.OutputExistsError, match="model already exists .a directory."):
        files.check_new(model, overwrite=False)
    files.check_new(model, overwrite=True)
    files.check_new(tmp_path / "empty_dir_is_free", overwrite=False)
    (tmp_path / "empty").mkdir()
    with files.atomic_dir(tmp_path / "empty") as tmp:  # an empty dir holds nothing to lose
        (tmp / "a").write_text("a")
    assert (tmp_path / "empty" / "a").read_text() == "a"


def test_manifest_names_a_missing_truncated_or_flipped_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"0123456789")
    (tmp_path / "sub" / "b.json").write_text("{}")
    assert files.verify_manifest(tmp_path) == (None, f"no {files.MANIFEST_NAME}")
    files.write_manifest(tmp_path)
    manifest = json.loads((tmp_path / files.MANIFEST_NAME).read_text())["files"]
    assert set(manifest) == {"a.bin", "sub/b.json"} and manifest["a.bin"]["size"] == 10
    assert files.verify_manifest(tmp_path) == (True, "")
    (tmp_path / "a.bin").write_bytes(b"0123456780")
    intact, problem = files.verify_manifest(tmp_path)
    assert intact is False and "a.bin does not match its sha256" in problem
    (tmp_path / "a.bin").write_bytes(b"01234")
    assert "a.bin is 5 bytes, 10 when written" in files.verify_manifest(tmp_path)[1]
    (tmp_path / "sub" / "b.json").unlink()
    (tmp_path / "a.bin").write_bytes(b"0123456789")
    assert "b.json is missing" in files.verify_manifest(tmp_path)[1]


def test_fingerprint_rehashes_only_touched_files_and_sees_content_not_mtime(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"weights" * 1000)
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / files.MANIFEST_NAME).write_text("{}")  # jaxalign's own record: not content
    hour_ago = time.time_ns() - 3600 * 10**9
    for name in ("model.safetensors", "config.json"):
        os.utime(tmp_path / name, ns=(hour_ago, hour_ago))
    first = files.fingerprint_dir(tmp_path)
    assert set(first["files"]) == {"model.safetensors", "config.json"}
    hashed = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda path: hashed.append(os.path.basename(path)) or real(path))
    again = files.fingerprint_dir(tmp_path, first)
    assert again["files"] == first["files"] and hashed == []  # untouched: one stat per file
    os.utime(tmp_path / "config.json", ns=(hour_ago, hour_ago + 10**9))  # touched, same bytes
    second = files.fingerprint_dir(tmp_path, again)
    assert hashed == ["config.json"] and files.fingerprint_difference(first, second) == ""
    hashed.clear()
    (tmp_path / "model.safetensors").write_bytes(b"weights" * 1000)  # rewritten just now ...
    racy = files.fingerprint_dir(tmp_path, second)
    assert files.fingerprint_difference(second, racy) == ""
    (tmp_path / "model.safetensors").write_bytes(b"Weights" * 1000)  # ... and within the same timestamp tick:
    assert "model.safetensors changed" in files.fingerprint_difference(racy, files.fingerprint_dir(tmp_path, racy))
    hashed.clear()
    (tmp_path / "model.safetensors").write_bytes(b"other!!" * 1000)  # same size, other bytes
    (tmp_path / "tokenizer.json").write_text("{}")
    third = files.fingerprint_dir(tmp_path, second)
    assert files.fingerprint_difference(second, third) == "tokenizer.json added, model.safetensors changed"
    assert "model.safetensors" in hashed
