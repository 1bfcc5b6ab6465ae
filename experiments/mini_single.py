"""The single-preference release of the mini dataset, for the single-preference baseline.

    python experiments/mini_single.py --mini out/mini --out out/mini_single

PKU-SafeRLHF's single-dimension release has one holistic preference per pair (the trade-off of
helpfulness and harmlessness judged at once) and no safety labels (pku_saferlhf.SINGLE_FIELDS).
The mini generator writes only the dual release, so this derives the single label from it,
safety first: the safe answer if exactly one is safe; the less severe one if both are unsafe and
their severities differ; else the more helpful one. The output has the release layout and the
`single-*` configs read it (config.data.name = "single-default").
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxalign.data import mini, pku_saferlhf as pku  # noqa: E402


def single_label(row: dict) -> int:
    """The holistic preference of a dual row: safety first, then severity, then helpfulness."""
    safe = (row["is_response_0_safe"], row["is_response_1_safe"])
    if safe[0] != safe[1]:
        return 0 if safe[0] else 1
    severity = (row["response_0_severity_level"], row["response_1_severity_level"])
    if severity[0] != severity[1]:
        return 0 if severity[0] < severity[1] else 1
    return row["better_response_id"]


def single_row(row: dict) -> dict:
    """A dual row as a single-dimension release row (SINGLE_FIELDS, in release order)."""
    out = {name: row[name] for name in pku.SINGLE_FIELDS}
    out["better_response_id"] = single_label(row)
    return out


def write_single(mini_dir: str, out_dir: str) -> dict[str, int]:
    """Every {subset}/{split}.jsonl of the dual release under mini_dir, as single rows under out_dir."""
    counts = {}
    for path in sorted(pathlib.Path(mini_dir).glob("data/*/*.jsonl")):
        rows, _ = pku.read_release(mini_dir, next(k for k, v in pku.SUBSET_DIRS.items() if v == path.parent.name),
                                   path.stem)
        target = pathlib.Path(out_dir) / "data" / path.parent.name / path.name
        mini.write_jsonl(target, [single_row(row) for row in rows])
        counts[f"{path.parent.name}/{path.name}"] = len(rows)
    if not counts:
        raise FileNotFoundError(f"{mini_dir}: no data/*/*.jsonl (write it with `jaxalign data mini --out {mini_dir}`)")
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mini", required=True, help="dual mini release dir (jaxalign data mini --out DIR)")
    parser.add_argument("--out", required=True, help="where to write the single-preference release")
    args = parser.parse_args(argv)
    for name, n in write_single(args.mini, args.out).items():
        print(f"{name}: {n} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
