"""Files a command writes or depends on: atomic outputs, refused overwrites, sha256 manifests, fingerprints.

    check_new(path, overwrite, "--out")             # OutputExistsError naming it unless --overwrite
    with atomic_dir(path, overwrite=..., manifest=True) as tmp:   # a temporary sibling of path
        write_everything_into(tmp)                  # renamed onto path only when the body finished
    with atomic_file(path, overwrite=...) as tmp:   # the same for one file
        tmp.write_text(...)
    write_manifest(dir); verify_manifest(dir)       # {file: size, sha256}: what was written, intact?
    fingerprint_dir(dir, previous)                  # the same, re-hashing only files whose size/mtime moved

A crash (SIGKILL, power loss) while the body of `atomic_dir` / `atomic_file` runs leaves `path` as it
was: the output is written into `.NAME.tmp-PID` beside it and renamed into place once complete. A
file is replaced with one `os.replace`. A directory cannot be renamed over a non-empty one, so the
old directory is first renamed to `.NAME.old-PID`, the new one renamed into place, then the old one
removed; a crash between the two renames leaves no `path` but the old directory beside it, which
`recover(path)` (called by every writer and reader here) renames back. Leftover temporary siblings
of dead processes are removed. With `manifest=True` the manifest is written last, inside the
temporary directory, so an output that has one was written completely.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import time
from typing import Iterator

log = logging.getLogger(__name__)

MANIFEST_NAME = "jaxalign_manifest.json"
_CHUNK = 8 << 20
_RACY_NS = 2 * 10**9  # files modified this close to a fingerprint are hashed again by the next one


class OutputExistsError(ValueError):
    """An output path exists and --overwrite was not given; the message names the path."""


def check_new(path: str | os.PathLike, overwrite: bool, flag: str = "--out") -> None:
    """OutputExistsError naming `path` when it exists and `overwrite` is off (checked before the
    command does its work, so nothing is computed for an output that would be refused). An empty
    directory holds nothing to lose and is used as if it did not exist."""
    path = pathlib.Path(path)
    recover(path)
    empty_dir = path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    if path.exists() and not empty_dir and not overwrite:
        what = "a directory" if path.is_dir() else "a file"
        raise OutputExistsError(f"{flag} {path} already exists ({what}); pass --overwrite to replace it, "
                                f"or choose another path")


def _sibling(path: pathlib.Path, kind: str, suffix: str = "") -> pathlib.Path:
    """.NAME.KIND-PID[SUFFIX] beside `path` (a suffix such as .png keeps writers that look at it happy)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}{suffix}")


def _sibling_pid(sibling: pathlib.Path, path: pathlib.Path, kind: str) -> int | None:
    digits = re.match(r"\d+", sibling.name[len(f".{path.name}.{kind}-"):])
    return int(digits.group()) if digits else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(path: str | os.PathLike) -> None:
    """Puts back `path` from its `.NAME.old-PID` sibling when a swap was cut between its two renames,
    and removes temporary siblings (`.NAME.tmp-PID`, `.NAME.old-PID`) of processes that are gone."""
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        return
    for kind in ("old", "tmp"):
        for sibling in sorted(path.parent.glob(f".{glob.escape(path.name)}.{kind}-*")):
            pid = _sibling_pid(sibling, path, kind)
            if pid is None or (pid != os.getpid() and _pid_alive(pid)):
                continue
            if kind == "old" and not path.exists():
                os.replace(sibling, path)
                log.warning("%s was cut off while being replaced; restored the previous version", path)
            else:
                _remove(sibling)


def _swap_dir_into_place(tmp: pathlib.Path, path: pathlib.Path) -> None:
    """Renames the finished directory `tmp` onto `path` (see the module docstring)."""
    if path.exists() or path.is_symlink():
        old = _sibling(path, "old")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: pathlib.Path) -> None:
    """Makes a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out",
               manifest: bool = False, writer: bool = True) -> Iterator[pathlib.Path]:
    """Yields an empty temporary sibling of `path`; when the body finishes, writes its manifest
    (manifest=True) and renames it onto `path`. An exception removes it and leaves `path` as it
    was. An existing `path` is OutputExistsError unless `overwrite`. writer=False (the processes
    other than 0 of a multi-host job, which write nothing) only checks and yields `path`."""
    path = pathlib.Path(path)
    check_new(path, overwrite, flag)
    if not writer:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        _swap_dir_into_place(tmp, path)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out") -> Iterator[pathlib.Path]:
    """Yields a temporary sibling path of the file `path` (the body writes it); renames it onto
    `path` when the body finishes. An exception removes it and leaves `path` as it was."""
    path = pathlib.Path(path)
    check_new(path, overwrite, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp", path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> pathlib.Path:
    """Writes `text` to `path` atomically (UTF-8); returns the path."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return pathlib.Path(path)


# ------------------------------------------------------------------------------------ manifests


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(root: pathlib.Path, files: list[pathlib.Path]) -> dict[str, str]:
    """{path relative to root: sha256}, hashed on a few threads (hashlib releases the GIL)."""
    if not files:
        return {}
    workers = max(1, min(8, os.cpu_count() or 1, len(files)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return {str(f.relative_to(root)): d for f, d in zip(files, pool.map(sha256_file, files))}


def _listed_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """Every file under `directory` but the manifest and hidden temporaries."""
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and not p.name.startswith((MANIFEST_NAME, f".{MANIFEST_NAME}")))


def write_manifest(directory: str | os.PathLike) -> pathlib.Path:
    """Writes DIRECTORY/jaxalign_manifest.json: {"files": {relative path: {"size", "sha256"}}} of
    every file under it (written beside, then renamed)."""
    directory = pathlib.Path(directory)
    files = _listed_files(directory)
    digests = hash_files(directory, files)
    entries = {str(f.relative_to(directory)): {"size": f.stat().st_size, "sha256": digests[str(f.relative_to(directory))]}
               for f in files}
    path = directory / MANIFEST_NAME
    tmp = directory / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"version": 1, "files": dict(sorted(entries.items()))}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def verify_manifest(directory: str | os.PathLike) -> tuple[bool | None, str]:
    """(True, "") when every file of DIRECTORY's manifest is there with its size and sha256;
    (False, "FILE: what is wrong") when one is not; (None, reason) when there is no manifest."""
    directory = pathlib.Path(directory)
    path = directory / MANIFEST_NAME
    if not path.exists():
        return None, f"no {MANIFEST_NAME}"
    try:
        expected = json.loads(path.read_text())["files"]
        items = [(rel, int(entry["size"]), str(entry["sha256"])) for rel, entry in expected.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        return False, f"{path}: unreadable manifest ({error})"
    present = []
    for rel, size, _ in items:
        file = directory / rel
        if not file.is_file():
            return False, f"{file} is missing"
        actual = file.stat().st_size
        if actual != size:
            return False, f"{file} is {actual} bytes, {size} when written (truncated or overwritten)"
        present.append(file)
    digests = hash_files(directory, present)
    for rel, _, sha256 in items:
        if digests[rel] != sha256:
            return False, f"{directory / rel} does not match its sha256 from when it was written (corrupted bytes)"
    return True, ""


# ------------------------------------------------------------------------------------ fingerprints


def fingerprint_dir(directory: str | os.PathLike, previous: dict | None = None) -> dict:
    """{"taken_ns": now, "files": {name: {"size", "mtime_ns", "sha256"}}} of the files of `directory`
    (its top level, what a model or tokenizer loader reads; not jaxalign_* records, hidden files or
    subdirectories such as a download's original/ weights).

    A file whose size and mtime equal its entry in `previous` (an earlier fingerprint of the same
    dir) keeps that entry's sha256 without being read, so a resume whose inputs are untouched
    costs a stat per file; a new or touched file is hashed (a touched file with the same bytes
    hashes the same and is not a change). As in git's racy-clean rule, a file modified less than
    _RACY_NS before `previous` was taken is hashed again: a rewrite within the filesystem's
    timestamp granularity could otherwise keep its mtime."""
    directory = pathlib.Path(directory)
    old = (previous or {}).get("files", {})
    trusted_before = int((previous or {}).get("taken_ns", 0)) - _RACY_NS
    taken_ns = time.time_ns()
    entries, to_hash = {}, []
    for file in sorted(p for p in directory.iterdir() if p.is_file()):
        if file.name.startswith(("jaxalign_", ".")):
            continue  # jaxalign's records of an export (manifest, step), temporaries: not its content
        rel, stat = str(file.relative_to(directory)), file.stat()
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        known = old.get(rel)
        if (known and known.get("size") == entry["size"] and known.get("mtime_ns") == entry["mtime_ns"]
                and entry["mtime_ns"] < trusted_before):
            entry["sha256"] = known["sha256"]
        else:
            to_hash.append(file)
        entries[rel] = entry
    for rel, digest in hash_files(directory, to_hash).items():
        entries[rel]["sha256"] = digest
    return {"taken_ns": taken_ns, "files": dict(sorted(entries.items()))}


def fingerprint_difference(old: dict, new: dict) -> str:
    """"" when two fingerprints hold the same files with the same bytes, else what differs
    (e.g. "model.safetensors changed, tokenizer.json added")."""
    before, after = old.get("files", {}), new.get("files", {})
    changes = [f"{rel} removed" for rel in sorted(before.keys() - after.keys())]
    changes += [f"{rel} added" for rel in sorted(after.keys() - before.keys())]
    changes += [f"{rel} changed" for rel in sorted(before.keys() & after.keys())
                if before[rel].get("sha256") != after[rel].get("sha256")]
    return ", ".join(changes[:4]) + (f" and {len(changes) - 4} more" if len(changes) > 4 else "")
