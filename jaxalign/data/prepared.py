"""The TFDS-prepared PKU-SafeRLHF dataset: the builder (ArrayRecord, no TensorFlow), `prepare` with
a source fingerprint (a stale cache is refused), and random access to a prepared split.

    prepare(source_dir, data_dir)                       # once (`jaxalign data prepare`)
    rows = load_prepared(data_dir, "default", "train")  # random access: rows[i] -> release dict

Beside the records, `prepare` stores the source fingerprint (relative paths, sizes, sha256 and the
validation options) and a per-row summary (`summarize_rows`, what the views filter on), so a view
over a `PreparedSplit` reads only the records it is asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
from collections import Counter
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxalign.data.pku_saferlhf import (
    FIELDS, NUM_CATEGORIES, SPLITS, ValidationReport, categories_dict, check_split_name, config_names,
    config_subsets, find_files, iter_rows, row_to_example,
)




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
