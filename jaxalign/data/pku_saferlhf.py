"""PKU-SafeRLHF release files: schema, row validation, reading, and a TFDS builder (ArrayRecord).

The release (v1, `PKU-Alignment/PKU-SafeRLHF`) is laid out as

    DIR/data/{Alpaca-7B,Alpaca2-7B,Alpaca3-8B}/{train,test}.jsonl   (or .parquet)

with 16 fields per row (`DUAL_FIELDS`). Two other kinds of files share the layout or come flat
(`DIR/{train,test}.jsonl` or `DIR/data/{train,test}*.parquet`):

    kind "single": the single-dimension release, the v1 fields minus safety, harm and severity;
    kind "v0":     the 2023 files (prompt, response_0/1, is_response_X_safe, better/safer ids).

Rows are kept in the release format (a plain dict, harm categories as a dict name -> bool) so
that views.py sees exactly what the files hold. Validation (`validate_row`) checks every row;
strict mode stops at the first bad row with an error naming file, line, field and value; lenient
mode skips bad rows and counts them per reason in a `ValidationReport`.

TFDS: `PkuSaferlhf` is a GeneratorBasedBuilder written as ArrayRecord, which TFDS 4.9 writes and
reads without TensorFlow. Configs: `default` (all three subsets), `alpaca-7b`, `alpaca2-7b`,
`alpaca3-8b`, the same with a `single-` prefix for the single-dimension release, and `v0`.

    prepare(source_dir, data_dir)                       # once
    rows = load_prepared(data_dir, "default", "train")  # random access: rows[i] -> release dict

Beside the records, `prepare` stores the source fingerprint (relative paths, sizes, sha256 and
the validation options) and a per-row summary (`summarize_rows`, what the views filter on).
Preparing again from the same files reuses the cache; from other files it is an error naming
the dir unless overwrite=True (`--overwrite`) rebuilds it: old rows are never served silently.
(Stages read prepared splits through `sources.read_split`.)

Files of a split: `{split}.jsonl` or `{split}*.parquet`, never both in one folder (an error
naming both); a directory with such a name is an error; split names are plain file-name stems
(`check_split_name`: no `/`, no `..`). The kind of a folder (`detect_kind`) is the one whose
field set is nearest the first row's fields, so a row missing a field is reported as missing it.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import re
from collections import Counter
from typing import Any, Iterator, Sequence

import numpy as np

HARM_CATEGORIES: tuple[str, ...] = (
    "Endangering National Security",
    "Insulting Behavior",
    "Discriminatory Behavior",
    "Endangering Public Health",
    "Copyright Issues",
    "Violence",
    "Drugs",
    "Privacy Violation",
    "Economic Crime",
    "Mental Manipulation",
    "Human Trafficking",
    "Physical Harm",
    "Sexual Content",
    "Cybercrime",
    "Disrupting Public Order",
    "Environmental Damage",
    "Psychological Harm",
    "White-Collar Crime",
    "Animal Abuse",
)
NUM_CATEGORIES = len(HARM_CATEGORIES)
MAX_SEVERITY = 3
SPLITS = ("train", "test")

# config name -> release subset directory
SUBSET_DIRS = {"alpaca-7b": "Alpaca-7B", "alpaca2-7b": "Alpaca2-7B", "alpaca3-8b": "Alpaca3-8B"}
KINDS = ("dual", "single", "v0")

# field name -> expected python type, per kind, in release order
DUAL_FIELDS: dict[str, type] = {
    "prompt": str,
    "response_0": str,
    "response_1": str,
    "prompt_source": str,
    "response_0_source": str,
    "response_1_source": str,
    "is_response_0_safe": bool,
    "is_response_1_safe": bool,
    "response_0_harm_category": dict,
    "response_1_harm_category": dict,
    "response_0_severity_level": int,
    "response_1_severity_level": int,
    "better_response_id": int,
    "safer_response_id": int,
    "response_0_sha256": str,
    "response_1_sha256": str,
}
_SAFETY_ONLY = (
    "is_response_0_safe", "is_response_1_safe",
    "response_0_harm_category", "response_1_harm_category",
    "response_0_severity_level", "response_1_severity_level",
    "safer_response_id",
)
SINGLE_FIELDS = {k: v for k, v in DUAL_FIELDS.items() if k not in _SAFETY_ONLY}
V0_FIELDS = {
    "prompt": str,
    "response_0": str,
    "response_1": str,
    "is_response_0_safe": bool,
    "is_response_1_safe": bool,
    "better_response_id": int,
    "safer_response_id": int,
}
FIELDS = {"dual": DUAL_FIELDS, "single": SINGLE_FIELDS, "v0": V0_FIELDS}


class DataError(ValueError):
    """A bad file or row; the message names the file, the line, the field and what was expected."""

    def __init__(self, path: str, line: int, field: str | None, reason: str, message: str):
        self.path, self.line, self.field, self.reason, self.message = str(path), line, field, reason, message
        where = f"{path}:{line}" + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")


@dataclasses.dataclass
class ValidationReport:
    """Counts from reading release files: rows read and kept, skipped rows per reason."""

    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    first_errors: list[str] = dataclasses.field(default_factory=list)

    def skip(self, error: DataError) -> None:
        self.skipped[error.reason] += 1
        if len(self.first_errors) < 20:
            self.first_errors.append(str(error))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "first_errors": list(self.first_errors),
        }


def response_sha256(prompt: str, response: str) -> str:
    """The release's `response_i_sha256`: hex sha256 of (prompt + response) in UTF-8."""
    return hashlib.sha256((prompt + response).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Validation


def _check_type(value: Any, expected: type) -> bool:
    if expected is int:  # bool is an int subclass in python; the release never uses it for ids
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _short_repr(value: Any, limit: int = 80) -> str:
    try:
        return f"{value!r:.{limit}}"
    except RecursionError:
        return f"<{type(value).__name__} nested too deeply to print>"


def validate_row(row: Any, kind: str = "dual", check_sha256: bool = True) -> None:
    """Raise DataError(path="", line=0, ...) at the first problem of one release row.

    Checks: a JSON object with exactly the fields of `kind`, each of its type; ids in {0, 1};
    severity in 0..3; exactly the 19 category keys with bool values; optionally the sha256.
    The caller fills in the file and line (see `_located`).
    """
    fields = FIELDS[kind]
    if not isinstance(row, dict):
        raise DataError("", 0, None, "not_an_object", f"expected a JSON object, got {type(row).__name__}")
    for name in fields:
        if name not in row:
            raise DataError("", 0, name, "missing_field", f"missing (expected fields of kind {kind!r})")
    for name in row:
        if name not in fields:
            raise DataError("", 0, name, "unexpected_field",
                            f"unexpected field for kind {kind!r}; expected exactly {list(fields)}")
    for name, expected in fields.items():
        value = row[name]
        if not _check_type(value, expected):
            raise DataError("", 0, name, "wrong_type",
                            f"expected {expected.__name__}, got {type(value).__name__} {_short_repr(value)}")
    for name in ("better_response_id", "safer_response_id"):
        if name in fields and row[name] not in (0, 1):
            raise DataError("", 0, name, "bad_id", f"expected 0 or 1, got {row[name]!r}")
    for i in (0, 1):
        name = f"response_{i}_severity_level"
        if name in fields and not 0 <= row[name] <= MAX_SEVERITY:
            raise DataError("", 0, name, "bad_severity", f"expected 0..{MAX_SEVERITY}, got {row[name]!r}")
        name = f"response_{i}_harm_category"
        if name in fields:
            cats = row[name]
            if set(cats) != set(HARM_CATEGORIES):
                missing = sorted(set(HARM_CATEGORIES) - set(cats))
                extra = sorted(set(cats) - set(HARM_CATEGORIES))
                raise DataError("", 0, name, "bad_categories",
                                f"expected exactly the 19 harm categories; missing {missing}, unknown {extra}")
            for key, flag in cats.items():
                if not isinstance(flag, bool):
                    raise DataError("", 0, name, "bad_categories",
                                    f"category {key!r}: expected bool, got {flag!r}")
        name = f"response_{i}_sha256"
        if check_sha256 and name in fields:
            expected_hash = response_sha256(row["prompt"], row[f"response_{i}"])
            if row[name] != expected_hash:
                raise DataError("", 0, name, "sha256_mismatch",
                                f"expected sha256(prompt + response_{i}) = {expected_hash}, got {row[name]!r}")


def _located(error: DataError, path: str, line: int) -> DataError:
    return DataError(path, line, error.field, error.reason, error.message)


# ---------------------------------------------------------------------------------------------
# Files


def _iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON or DataError) for every line of a .jsonl file."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    ends_with_newline = data.endswith(b"\n")
    if ends_with_newline:
        lines = lines[:-1]
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines)
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            yield number, DataError(path, number, None, "blank_line", "blank line (expected one JSON object per line)")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield number, DataError(path, number, None, "invalid_utf8",
                                    f"invalid UTF-8 at byte {e.start} of the line: {raw[max(0, e.start - 10):e.start + 10]!r}")
            continue
        try:
            yield number, json.loads(text)
        except RecursionError:
            yield number, DataError(path, number, None, "bad_json",
                                    "JSON nested too deeply to parse (a release row is one flat object)")
        except json.JSONDecodeError as e:
            if is_last and not ends_with_newline:
                yield number, DataError(path, number, None, "truncated_line",
                                        f"truncated last line (no newline, JSON ends early: {e.msg} at column {e.colno})")
            else:
                yield number, DataError(path, number, None, "bad_json", f"bad JSON: {e.msg} at column {e.colno}")


def _iter_parquet(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield number, row


def iter_file(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, row dict or DataError) for a .jsonl or .parquet file."""
    path = str(path)
    if path.endswith(".parquet"):
        return _iter_parquet(path)
    return _iter_jsonl(path)


SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_split_name(split: str) -> str:
    """Reject split names that are not a plain file-name stem (e.g. '../x', 'a/b', '')."""
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
        raise ValueError(f"split name {split!r}: expected letters, digits, '_' or '-' (the stem of a file "
                         f"inside the dataset folder, such as 'train' or 'test')")
    return split


def _regular_file(path: pathlib.Path, what: str) -> str:
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise ValueError(f"{path}: is {kind}; expected {what}")
    return str(path)


def _split_files(folder: pathlib.Path, split: str) -> list[str]:
    """The files of one split in a folder: {split}.jsonl or {split}*.parquet (sorted), never both."""
    jsonl = folder / f"{split}.jsonl"
    parquet = sorted(folder.glob(f"{glob.escape(split)}*.parquet"))  # folder names may hold [ ] * ?
    if jsonl.exists() and parquet:
        raise ValueError(f"{folder}: split {split!r} is in two formats, {jsonl.name} and "
                         f"{', '.join(p.name for p in parquet)}; keep one (a reader would use one and drop the other)")
    if jsonl.exists():
        return [_regular_file(jsonl, "a JSON-lines file (one JSON object per line)")]
    return [_regular_file(p, "a parquet file") for p in parquet]


def config_subsets(config: str) -> tuple[str, list[str]]:
    """Config name -> (kind, subset config names); e.g. 'single-alpaca-7b' -> ('single', ['alpaca-7b'])."""
    kind = "dual"
    name = config
    if config == "v0":
        return "v0", []
    if config.startswith("single-"):
        kind, name = "single", config[len("single-"):]
    if name == "default":
        return kind, list(SUBSET_DIRS)
    if name not in SUBSET_DIRS:
        raise ValueError(f"unknown config {config!r}; expected one of {config_names()}")
    return kind, [name]


def config_names() -> list[str]:
    """All builder config names."""
    base = ["default", *SUBSET_DIRS]
    return base + [f"single-{n}" for n in base] + ["v0"]


def find_files(source_dir: str | os.PathLike, config: str = "default", split: str = "train") -> list[str]:
    """Release files of (config, split) under source_dir; subsets that are absent are left out.

    A flat layout (no subset folders: DIR/{split}.jsonl or DIR/data/{split}*.parquet) is read as
    the whole dataset for `default`, `single-default` and `v0`.
    """
    root = pathlib.Path(source_dir)
    _, subsets = config_subsets(config)
    check_split_name(split)
    files: list[str] = []
    for subset in subsets:
        files += _split_files(root / "data" / SUBSET_DIRS[subset], split)
    if not files and config in ("default", "single-default", "v0"):
        for folder in (root / "data", root):
            files = _split_files(folder, split)
            if files:
                break
    return files


def kind_of_row(row: dict, kinds: Sequence[str] = KINDS) -> str:
    """The kind of `kinds` whose field set is nearest the row's fields (fewest missing + unexpected;
    ties: the first, dual).

    A row missing one field keeps its kind, so validation then names the missing field and line
    instead of reporting every field of another kind as unexpected.
    """
    keys = set(row)
    return min(kinds, key=lambda kind: len(keys ^ set(FIELDS[kind])))


def detect_kind(source_dir: str | os.PathLike) -> str:
    """The kind ('dual', 'single', 'v0') of the first JSON object found, by its nearest field set.
    A file in a subset folder (data/Alpaca-7B/...) is dual or single: the v0 release has none."""
    subset_dirs = {pathlib.Path(source_dir) / "data" / name for name in SUBSET_DIRS.values()}
    for config in ("default", "v0"):
        for split in SPLITS:
            for path in find_files(source_dir, config, split):
                kinds = ("dual", "single") if pathlib.Path(path).parent in subset_dirs else KINDS
                for _, row in iter_file(path):
                    if isinstance(row, dict):
                        return kind_of_row(row, kinds)
    raise FileNotFoundError(f"{source_dir}: no release file found (expected data/<Model>/{{train,test}}.jsonl)")


def iter_rows(
    paths: Sequence[str],
    kind: str = "dual",
    *,
    strict: bool = True,
    check_sha256: bool = True,
    report: ValidationReport | None = None,
) -> Iterator[tuple[str, int, dict]]:
    """Yield (path, line, row) for every valid row of the files, validating each.

    strict: raise the first DataError. Otherwise skip the row and count it in `report`.
    """
    if report is None:
        report = ValidationReport()
    for path in paths:
        for line, row in iter_file(path):
            report.rows_read += 1
            try:
                if isinstance(row, DataError):
                    raise row
                try:
                    validate_row(row, kind, check_sha256)
                except DataError as e:
                    raise _located(e, path, line) from None
            except DataError as e:
                if strict:
                    raise
                report.skip(e)
                continue
            report.rows_kept += 1
            yield path, line, row


def read_release(
    source_dir: str | os.PathLike,
    config: str = "default",
    split: str = "train",
    *,
    strict: bool = True,
    check_sha256: bool = True,
) -> tuple[list[dict], ValidationReport]:
    """Read and validate one (config, split) of a release-layout dir -> (rows, report)."""
    kind, _ = config_subsets(config)
    paths = find_files(source_dir, config, split)
    if not paths:
        raise FileNotFoundError(f"{source_dir}: no files for config {config!r}, split {split!r}")
    report = ValidationReport()
    rows = [row for _, _, row in iter_rows(paths, kind, strict=strict, check_sha256=check_sha256, report=report)]
    return rows, report


# ---------------------------------------------------------------------------------------------
# Encoding rows as TFDS examples and back


def categories_vector(categories: dict[str, bool]) -> np.ndarray:
    """Harm-category dict -> bool [19] in HARM_CATEGORIES order."""
    return np.array([bool(categories[name]) for name in HARM_CATEGORIES], dtype=np.bool_)


def categories_dict(vector: Sequence[bool]) -> dict[str, bool]:
    """bool [19] -> harm-category dict in release order."""
    return {name: bool(flag) for name, flag in zip(HARM_CATEGORIES, vector)}


def row_to_example(row: dict, kind: str = "dual") -> dict[str, Any]:
    """Release row -> TFDS example (category dicts become bool [19] vectors)."""
    example = {}
    for name, expected in FIELDS[kind].items():
        value = row[name]
        example[name] = categories_vector(value) if expected is dict else value
    return example


def example_to_row(example: dict, kind: str = "dual") -> dict:
    """TFDS example (bytes, numpy scalars, bool [19]) -> release row (str, int, bool, dict)."""
    row = {}
    for name, expected in FIELDS[kind].items():
        value = example[name]
        if expected is str:
            row[name] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        elif expected is dict:
            row[name] = categories_dict(value)
        else:
            row[name] = expected(value)
    return row
