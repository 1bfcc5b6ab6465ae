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

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import re
import shutil
import sys
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


# ---------------------------------------------------------------------------------------------
# TFDS builder

import tensorflow_datasets as tfds  # noqa: E402  (after the schema so a broken TFDS only breaks the builder)


def _features(kind: str) -> "tfds.features.FeaturesDict":
    spec = {}
    for name, expected in FIELDS[kind].items():
        if expected is str:
            spec[name] = tfds.features.Text()
        elif expected is bool:
            spec[name] = tfds.features.Scalar(np.bool_)
        elif expected is int:
            spec[name] = tfds.features.Scalar(np.int32)
        else:
            spec[name] = tfds.features.Tensor(shape=(NUM_CATEGORIES,), dtype=np.bool_)
    return tfds.features.FeaturesDict(spec)


@dataclasses.dataclass
class PkuSaferlhfConfig(tfds.core.BuilderConfig):
    kind: str = "dual"


class PkuSaferlhf(tfds.core.GeneratorBasedBuilder):
    """PKU-SafeRLHF from a local release-layout dir (the `manual_dir`), stored as ArrayRecord."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "PKU-SafeRLHF v1 (dual), single-dimension and v0 files."}
    BUILDER_CONFIGS = [
        PkuSaferlhfConfig(name=name, kind=config_subsets(name)[0], description=f"PKU-SafeRLHF config {name}")
        for name in config_names()
    ]
    DEFAULT_CONFIG_NAME = "default"
    # TFDS looks for a checksums file beside the builder's code via `importlib_resources`, which
    # is not installed with TFDS 4.9.10; a manual-dir builder downloads nothing, so no checksums.
    code_path = None
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the release directory (data/<Model>/{train,test}.jsonl) as the manual dir: "
        "`jaxalign data prepare --source DIR --data-dir CACHE`."
    )

    def __init__(self, *, strict: bool = True, check_sha256: bool = True, **kwargs):
        self.strict = strict
        self.check_sha256 = check_sha256
        self.reports: dict[str, ValidationReport] = {}
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="PKU-SafeRLHF preference data with safety meta-labels (CC-BY-NC-4.0).",
            features=_features(self.builder_config.kind),
            homepage="https://huggingface.co/datasets/PKU-Alignment/PKU-SafeRLHF",
            disable_shuffling=True,  # keep file order: row i of a split is line i of its files
        )

    def _split_generators(self, dl_manager):
        source = dl_manager.manual_dir
        generators = {}
        for split in SPLITS:
            paths = find_files(source, self.builder_config.name, split)
            if paths:
                generators[split] = self._generate_examples(split, paths)
        if not generators:
            raise FileNotFoundError(f"{source}: no files for config {self.builder_config.name!r}")
        return generators

    def _generate_examples(self, split, paths):
        kind = self.builder_config.kind
        report = self.reports.setdefault(split, ValidationReport())
        for path, line, row in iter_rows(paths, kind, strict=self.strict, check_sha256=self.check_sha256,
                                         report=report):
            yield f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}:{line}", row_to_example(row, kind)


FINGERPRINT_FILE = "source_fingerprint.json"
REPORT_FILE = "validation_report.json"
SUMMARY_FILE = "row_summary-{split}.npz"


def source_fingerprint(
    source_dir: str | os.PathLike, config: str, *, strict: bool = True, check_sha256: bool = True, hashes: bool = True
) -> dict[str, Any]:
    """What a prepared config was built from: every source file (path relative to source_dir, size,
    sha256 unless hashes=False) per split, and the validation options."""
    root = pathlib.Path(source_dir)
    files: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        for path in find_files(root, config, split):
            entry: dict[str, Any] = {"split": split, "size": os.path.getsize(path)}
            if hashes:
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                entry["sha256"] = digest.hexdigest()
            files[os.path.relpath(path, root)] = entry
    return {"config": config, "files": files, "strict": strict, "check_sha256": check_sha256}


def _stale_reason(stored: dict | None, current: dict) -> str | None:
    """Why a prepared config does not match the current source (None when it does)."""
    if stored is None:
        return f"has no {FINGERPRINT_FILE} (prepared by an older jaxalign or interrupted), so its source is unknown"
    old, new = stored.get("files", {}), current["files"]
    changed = sorted(set(old) ^ set(new)) + sorted(
        name for name in set(old) & set(new)
        if any(old[name].get(k) != new[name].get(k) for k in new[name] if k in old[name]))
    if changed:
        return f"was prepared from other source files (changed, added or removed: {', '.join(changed[:5])})"
    for option in ("strict", "check_sha256"):
        if stored.get(option) != current.get(option):
            return f"was prepared with {option}={stored.get(option)}, now {option}={current.get(option)}"
    return None


def _read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def summarize_rows(rows: Sequence[dict], kind: str) -> dict[str, np.ndarray]:
    """Per-row labels the views filter on, so a view over a prepared split can be built without
    reading its records: identical responses, better/safer ids (-1 absent), safety flags, and
    whether the row is the last occurrence of its prompt (prompt deduplication)."""
    n = len(rows)
    out = {
        "identical": np.zeros(n, bool), "better_id": np.full(n, -1, np.int8), "safer_id": np.full(n, -1, np.int8),
        "safe_0": np.zeros(n, bool), "safe_1": np.zeros(n, bool), "prompt_last": np.zeros(n, bool),
    }
    last: dict[str, int] = {}
    for i, row in enumerate(rows):
        out["identical"][i] = row["response_0"] == row["response_1"]
        out["better_id"][i] = row["better_response_id"]
        if kind != "single":
            out["safer_id"][i] = row["safer_response_id"]
            out["safe_0"][i] = row["is_response_0_safe"]
            out["safe_1"][i] = row["is_response_1_safe"]
        last[row["prompt"]] = i
    out["prompt_last"][list(last.values())] = True
    return out


def prepare(
    source_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    config: str = "default",
    *,
    strict: bool = True,
    check_sha256: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Validate and write one config of a release-layout dir as ArrayRecord under data_dir.

    Returns {"config", "kind", "path", "cache", "splits": {split: n}, "validation": {split: report dict}}.
    Beside the records it stores the source fingerprint (files, sizes, sha256, options) and a row
    summary per split (`summarize_rows`). Preparing again: the same source reuses the files
    (cache "reused"); other source files or options raise a ValueError naming the dir, unless
    overwrite=True, which rebuilds it (cache "rebuilt"). Old rows are never served silently.
    """
    if config not in config_names():
        raise ValueError(f"unknown config {config!r}; expected one of {config_names()}")
    if not find_files(source_dir, config, "train") and not find_files(source_dir, config, "test"):
        raise FileNotFoundError(f"{source_dir}: no release files for config {config!r} "
                                "(expected data/<Model>/{train,test}.jsonl or .parquet)")
    fingerprint = source_fingerprint(source_dir, config, strict=strict, check_sha256=check_sha256)
    builder = PkuSaferlhf(config=config, data_dir=str(data_dir), strict=strict, check_sha256=check_sha256)
    cache = "new"
    if builder.is_prepared():
        reason = _stale_reason(_read_json(os.path.join(builder.data_dir, FINGERPRINT_FILE)), fingerprint)
        if reason is None:
            cache = "reused"
        elif not overwrite:
            raise ValueError(f"{builder.data_dir}: the prepared config {config!r} {reason}; pass --overwrite "
                             f"(prepare(..., overwrite=True)) to rebuild it from {source_dir}")
        else:
            print(f"{builder.data_dir}: {reason}; rebuilding it from {source_dir}", file=sys.stderr)
            shutil.rmtree(builder.data_dir)
            builder = PkuSaferlhf(config=config, data_dir=str(data_dir), strict=strict, check_sha256=check_sha256)
            cache = "rebuilt"
    if cache != "reused":
        with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress to stdout; keep stdout for results
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=str(source_dir)),
            )
    result = {
        "config": config,
        "kind": builder.builder_config.kind,
        "path": str(builder.data_dir),
        "cache": cache,
        "splits": {name: info.num_examples for name, info in builder.info.splits.items()},
        "validation": {split: r.to_dict() for split, r in builder.reports.items()},
    }
    if cache == "reused":
        result["validation"] = (_read_json(os.path.join(builder.data_dir, REPORT_FILE)) or {}).get("validation", {})
        return result
    with open(os.path.join(builder.data_dir, REPORT_FILE), "w") as f:
        json.dump(result, f, indent=1)
    for split in result["splits"]:
        rows = PreparedSplit(data_dir, config, split)
        np.savez(os.path.join(builder.data_dir, SUMMARY_FILE.format(split=split)), **summarize_rows(rows, rows.kind))
    with open(os.path.join(builder.data_dir, FINGERPRINT_FILE), "w") as f:  # last: marks the cache complete
        json.dump(fingerprint, f, indent=1)
    return result


def prepared_contents(data_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Configs prepared under a TFDS data dir -> their splits (from each dataset_info.json)."""
    found: dict[str, list[str]] = {}
    root = pathlib.Path(data_dir) / PkuSaferlhf.name
    for info in sorted(root.glob(f"*/{PkuSaferlhf.VERSION}/dataset_info.json")):
        splits = [s.get("name") for s in (_read_json(info) or {}).get("splits", [])]
        found[info.parent.parent.name] = [s for s in SPLITS if s in splits] + sorted(set(splits) - set(SPLITS))
    return found


def _describe_contents(data_dir: str | os.PathLike) -> str:
    found = prepared_contents(data_dir)
    if not found:
        return "it holds no prepared config (run `jaxalign data prepare --source DIR --data-dir CACHE`)"
    return "it holds " + "; ".join(f"{c} ({', '.join(s)})" for c, s in found.items())


class PreparedSplit(Sequence):
    """Random access to a prepared split: `rows[i]` -> release-format dict; `rows.examples[i]` TFDS-decoded.

    Nothing is read when it is opened: a record is read when its row is asked for (`rows[i]`,
    `rows.read(indices)`, iteration). Rows are parsed straight from the stored tf.train.Example
    protos, several times faster than the generic TFDS feature decoding. `summary()` gives the
    per-row labels stored at prepare time (see `summarize_rows`), `report()` the validation report.
    """

    def __init__(self, data_dir: str | os.PathLike, config: str = "default", split: str = "train"):
        from tensorflow_datasets.core import decode

        if config not in config_names():
            raise ValueError(f"unknown config {config!r}; expected one of {config_names()}")
        check_split_name(split)
        self.kind, _ = config_subsets(config)
        self.config, self.split = config, split
        builder = PkuSaferlhf(config=config, data_dir=str(data_dir))
        if not builder.is_prepared():
            raise FileNotFoundError(f"{data_dir}: config {config!r} is not prepared (run `jaxalign data prepare`); "
                                    f"{_describe_contents(data_dir)}")
        if split not in builder.info.splits:
            raise FileNotFoundError(f"{data_dir}: config {config!r} has no split {split!r}; "
                                    f"{_describe_contents(data_dir)}")
        self.path = str(builder.data_dir)
        self.examples = builder.as_data_source(split=split)
        self._records = builder.as_data_source(split=split, deserialize_method=decode.DeserializeMethod.RAW_BYTES)
        self._summary: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._records)

    def _parse(self, record: bytes) -> dict:
        from tensorflow_datasets.proto import tf_example_pb2

        feature = tf_example_pb2.Example.FromString(record).features.feature
        row = {}
        for name, expected in FIELDS[self.kind].items():
            if expected is str:
                row[name] = feature[name].bytes_list.value[0].decode("utf-8")
            elif expected is dict:
                row[name] = categories_dict(feature[name].int64_list.value)
            else:
                row[name] = expected(feature[name].int64_list.value[0])
        return row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.read(range(*index.indices(len(self))))
        return self._parse(self._records[range(len(self))[index]])  # IndexError / negative as a list

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self), 1024):
            yield from self.read(range(start, min(start + 1024, len(self))))

    def read(self, indices: Sequence[int]) -> list[dict]:
        """Rows at `indices`, read in one batched ArrayRecord call."""
        whole = range(len(self))
        indices = [whole[int(i)] for i in indices]  # IndexError / negative as a list
        if not indices:
            return []
        return [self._parse(r) for r in self._records.__getitems__(indices)]

    def summary(self) -> dict[str, np.ndarray]:
        """The per-row labels stored at prepare time (computed by reading every row if absent)."""
        if self._summary is None:
            path = os.path.join(self.path, SUMMARY_FILE.format(split=self.split))
            if os.path.exists(path):
                with np.load(path, allow_pickle=False) as data:
                    summary = {k: data[k] for k in data.files}
            else:
                summary = summarize_rows(self, self.kind)
            if any(len(v) != len(self) for v in summary.values()):
                raise ValueError(f"{path}: row summary has {len(summary['identical'])} rows, the split {len(self)}; "
                                 "prepare the config again with --overwrite")
            self._summary = summary
        return self._summary

    def report(self) -> ValidationReport:
        """The validation report of this split from prepare time (all rows kept when none was stored)."""
        stored = (_read_json(os.path.join(self.path, REPORT_FILE)) or {}).get("validation", {}).get(self.split)
        if not stored:
            return ValidationReport(rows_read=len(self), rows_kept=len(self))
        return ValidationReport(rows_read=stored["rows_read"], rows_kept=stored["rows_kept"],
                                skipped=Counter(stored["skipped_by_reason"]),
                                first_errors=list(stored["first_errors"]))

    def check_source(self, source_dir: str | os.PathLike) -> None:
        """Raise a ValueError when source_dir's files (paths and sizes; no hashing) are not the ones
        this config was prepared from."""
        stored = _read_json(os.path.join(self.path, FINGERPRINT_FILE))
        current = source_fingerprint(source_dir, self.config, hashes=False)
        if stored is not None:
            current["strict"], current["check_sha256"] = stored.get("strict"), stored.get("check_sha256")
        reason = _stale_reason(stored, current)
        if reason is not None:
            raise ValueError(f"{self.path}: the prepared config {self.config!r} {reason}, not from {source_dir}; "
                             f"prepare it again with --overwrite")


def load_prepared(data_dir: str | os.PathLike, config: str = "default", split: str = "train") -> PreparedSplit:
    """Open a prepared (config, split) for random access to release-format rows."""
    return PreparedSplit(data_dir, config, split)
