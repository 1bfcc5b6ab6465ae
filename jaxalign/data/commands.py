"""`jaxalign data ...`: mini, validate, stats, prepare.

    jaxalign data mini --out DIR [--variant mini|hard] [--rows N --seed S --noise P] [--overwrite]
    jaxalign data validate DIR [--config NAME] [--lenient] [--no-sha256]
    jaxalign data stats DIR [--config NAME] [--json] [--plot out.png] [--overwrite]
    jaxalign data prepare --source DIR --data-dir CACHE [--config NAME ...] [--lenient] [--overwrite]

`mini --out` and `stats --plot` are written atomically (a temporary sibling renamed into place,
jaxalign/files.py); an existing one is refused unless --overwrite.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any, Iterable

import tqdm

from jaxalign import files
from jaxalign.data import pku_saferlhf as pku

from jaxalign.data import prepared as prepared_lib


def pair_stats(rows: Iterable[dict], kind: str = "dual") -> dict[str, Any]:
    """Label statistics of release rows.

    Returns rows, responses safe/unsafe, responses per harm category and per severity, pairs
    both-safe / one-safe / both-unsafe, inconsistent pairs (safer response labelled unsafe while
    the other is labelled safe, https://github.com/PKU-Alignment/safe-rlhf/issues/181) and how often
    better == safer.
    """
    stats: dict[str, Any] = {"rows": 0}
    has_safety = kind in ("dual", "v0")
    safe = Counter()
    pairs = Counter()
    categories = Counter()
    severity = Counter()
    inconsistent = 0
    better_is_safer = 0
    for row in rows:
        stats["rows"] += 1
        if not has_safety:
            continue
        flags = [row["is_response_0_safe"], row["is_response_1_safe"]]
        for flag in flags:
            safe["safe" if flag else "unsafe"] += 1
        pairs[{2: "both_safe", 1: "one_safe", 0: "both_unsafe"}[sum(flags)]] += 1
        s = row["safer_response_id"]
        if not flags[s] and flags[1 - s]:
            inconsistent += 1
        better_is_safer += int(row["better_response_id"] == s)
        if kind == "dual":
            for i in (0, 1):
                severity[row[f"response_{i}_severity_level"]] += 1
                for name, flag in row[f"response_{i}_harm_category"].items():
                    categories[name] += int(flag)
    if has_safety:
        stats["responses_safe"] = safe["safe"]
        stats["responses_unsafe"] = safe["unsafe"]
        stats["pairs"] = {k: pairs[k] for k in ("both_safe", "one_safe", "both_unsafe")}
        stats["inconsistent_pairs"] = inconsistent
        stats["better_is_safer"] = better_is_safer
    if kind == "dual":
        stats["responses_per_category"] = {name: categories[name] for name in pku.HARM_CATEGORIES}
        stats["responses_per_severity"] = {str(k): severity[k] for k in range(pku.MAX_SEVERITY + 1)}
    return stats


def _configs_present(source: str, config: str | None, kind: str) -> list[str]:
    if config:
        return [config]
    if kind == "v0":
        return ["v0"]
    prefix = "single-" if kind == "single" else ""
    present = [prefix + name for name in pku.SUBSET_DIRS
               if any(pku.find_files(source, prefix + name, split) for split in pku.SPLITS)]
    return present or [prefix + "default"]


def _count_rows(path: str) -> int:
    """Rows of one release file, cheaply: parquet metadata, or the newlines of a JSONL file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


def _progress(rows: Iterable, paths: list[str], desc: str) -> Iterable:
    """`rows` (read from `paths`) behind a tqdm bar on stderr with rate and ETA."""
    return tqdm.tqdm(rows, total=sum(_count_rows(p) for p in paths), desc=desc, unit="rows", file=sys.stderr)


def dataset_stats(source: str, config: str | None = None, *, strict: bool = True) -> dict[str, Any]:
    """Stats per (config, split) of a release-layout dir: {config: {split: pair_stats}}."""
    kind = pku.detect_kind(source) if config is None else pku.config_subsets(config)[0]
    result: dict[str, Any] = {"kind": kind, "configs": {}}
    for name in _configs_present(source, config, kind):
        per_split = {}
        for split in pku.SPLITS:
            paths = pku.find_files(source, name, split)
            if paths:
                report = pku.ValidationReport()
                rows = (row for _, _, row in _progress(pku.iter_rows(paths, kind, strict=strict, check_sha256=False,
                                                                     report=report), paths, f"stats {name}/{split}"))
                per_split[split] = pair_stats(rows, kind)
                if report.skipped:
                    per_split[split]["skipped_rows"] = report.to_dict()["skipped_by_reason"]
        result["configs"][name] = per_split
    return result


def _print_stats(stats: dict[str, Any]) -> None:
    print(f"kind: {stats['kind']}")
    for config, per_split in stats["configs"].items():
        for split, s in per_split.items():
            print(f"\n[{config} / {split}] rows {s['rows']}")
            if "pairs" in s:
                print(f"  responses safe {s['responses_safe']}  unsafe {s['responses_unsafe']}")
                p = s["pairs"]
                print(f"  pairs both-safe {p['both_safe']}  one-safe {p['one_safe']}  both-unsafe {p['both_unsafe']}")
                print(f"  inconsistent pairs (#181: safer labelled unsafe, other safe) {s['inconsistent_pairs']}")
                print(f"  better == safer {s['better_is_safer']}")
            if "responses_per_severity" in s:
                print("  severity " + "  ".join(f"{k}:{v}" for k, v in s["responses_per_severity"].items()))
                for name, count in s["responses_per_category"].items():
                    print(f"    {name:<32s}{count:>8d}")


def _plot_stats(stats: dict[str, Any], path: str, overwrite: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = Counter()
    severity = Counter()
    for per_split in stats["configs"].values():
        for s in per_split.values():
            categories.update(s.get("responses_per_category", {}))
            severity.update(s.get("responses_per_severity", {}))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 1]})
    names = list(pku.HARM_CATEGORIES)
    ax0.barh(names, [categories[n] for n in names])
    ax0.invert_yaxis()
    ax0.set_xlabel("responses")
    ax0.set_title("harm categories")
    levels = [str(k) for k in range(pku.MAX_SEVERITY + 1)]
    ax1.bar(levels, [severity[k] for k in levels])
    ax1.set_xlabel("severity level")
    ax1.set_title("severity")
    fig.tight_layout()
    with files.atomic_file(path, overwrite=overwrite, flag="--plot") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("mini", help="write the generated mini dataset in the release layout")
    p.add_argument("--out", required=True)
    p.add_argument("--variant", default="mini", choices=("mini", "hard"),
                   help="mini (jaxalign/data/mini.py) or hard: + look-alike benign requests, answers that turn "
                        "unsafe late, test-only phrasings (jaxalign/data/hard.py)")
    p.add_argument("--rows", type=int, default=3000, help="rows over all subsets and splits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.02, help="probability of flipping each preference id")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")

    p = sub.add_parser("validate", help="validate every row of a release-layout dir")
    p.add_argument("dir")
    p.add_argument("--config", default=None, help="config name (default: detected, all subsets)")
    p.add_argument("--lenient", action="store_true", help="skip bad rows and count them instead of stopping")
    p.add_argument("--no-sha256", action="store_true", help="do not check response_i_sha256")

    p = sub.add_parser("stats", help="label statistics per config and split")
    p.add_argument("dir")
    p.add_argument("--config", default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", default=None, help="write a PNG of category and severity counts")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")

    p = sub.add_parser("prepare", help="validate and write ArrayRecord files (TFDS) for random access")
    p.add_argument("--source", required=True, help="release-layout dir")
    p.add_argument("--data-dir", required=True, help="TFDS data dir (cache)")
    p.add_argument("--config", action="append", default=None,
                   help=f"config(s) to prepare (default: default / single-default / v0 by kind); "
                        f"one of {pku.config_names()}")
    p.add_argument("--lenient", action="store_true")
    p.add_argument("--no-sha256", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild a config already prepared in --data-dir from other source files or options "
                        "(without it that is an error; the same source is reused)")


def run(args) -> int:
    command = args.data_command
    if command == "mini":
        from jaxalign.data import hard, mini

        write = hard.write_hard if args.variant == "hard" else mini.write_mini
        with files.atomic_dir(args.out, overwrite=args.overwrite) as tmp:
            counts = write(tmp, rows=args.rows, seed=args.seed, noise=args.noise)
        print(json.dumps({"out": args.out, "variant": args.variant, "rows": counts}, indent=1))
        return 0
    try:
        if command == "validate":
            return _validate(args)
        if command == "stats":
            if args.plot:
                files.check_new(args.plot, args.overwrite, "--plot")
            stats = dataset_stats(args.dir, args.config)
            if args.json:
                print(json.dumps(stats, indent=1))
            else:
                _print_stats(stats)
            if args.plot:
                _plot_stats(stats, args.plot, args.overwrite)
                print(f"wrote {args.plot}", file=sys.stderr)
            return 0
        if command == "prepare":
            kind = pku.detect_kind(args.source)
            configs = args.config or [{"dual": "default", "single": "single-default", "v0": "v0"}[kind]]
            for config in configs:
                result = prepared_lib.prepare(args.source, args.data_dir, config, strict=not args.lenient,
                                     check_sha256=not args.no_sha256, overwrite=args.overwrite)
                print(json.dumps(result, indent=1))
            return 0
    except pku.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    raise ValueError(f"unknown data command {command!r}")


def _validate(args) -> int:
    kind = pku.detect_kind(args.dir) if args.config is None else pku.config_subsets(args.config)[0]
    config = args.config or {"dual": "default", "single": "single-default", "v0": "v0"}[kind]
    total = pku.ValidationReport()
    found = 0
    for split in pku.SPLITS:
        paths = pku.find_files(args.dir, config, split)
        if not paths:
            continue
        found += len(paths)
        report = pku.ValidationReport()
        rows = pku.iter_rows(paths, kind, strict=not args.lenient, check_sha256=not args.no_sha256, report=report)
        for _ in _progress(rows, paths, f"validate {split}"):
            pass
        print(f"{split}: {len(paths)} file(s), read {report.rows_read}, valid {report.rows_kept}, "
              f"skipped {sum(report.skipped.values())} {dict(report.skipped)}")
        for message in report.first_errors:
            print(f"  {message}")
        total.rows_read += report.rows_read
        total.rows_kept += report.rows_kept
        total.skipped.update(report.skipped)
    if not found:
        raise FileNotFoundError(f"{args.dir}: no release files for config {config!r} "
                                "(expected data/<Model>/{train,test}.jsonl or .parquet)")
    print(f"kind {kind}, config {config}: {total.rows_kept}/{total.rows_read} rows valid")
    return 0 if not total.skipped else 1


COMMANDS = {"data": (add_arguments, run)}
