"""Where a stage's rows come from: the release files, or the TFDS-prepared ArrayRecord dataset.

Stages call one function:

    rows, report = read_split(source, name, split, prepared_dir=prepared_dir)
    examples = views.sft_examples(rows, ...)          # or any other view
    batches = pipeline.make_batches("sft", examples, ...)

prepared_dir == "" (config.data.prepared_dir unset): `rows` is a list of release dicts read and
validated from the files under `source` (`pku_saferlhf.read_release`, strict, sha256 checked),
`report` what was read.

prepared_dir set: `rows` is a `prepared_lib.PreparedSplit` over the ArrayRecord files that
`jaxalign data prepare --source SRC --data-dir PREPARED_DIR` wrote for config `name`: a lazy
random-access Sequence whose row i is the same dict (same fields, same Python types) as row i
of the release list; `report` is the validation report stored at prepare time (the rows were
validated then). Opening it reads no record.

Each host reading its own shard: a view over a PreparedSplit returns `views.LazyExamples` (the
same examples, order and counts as over the list, built on access; the filters use a per-row
summary stored at prepare time, so the view reads one record to check fields). The batch
pipeline computes the same global index batches on every process and builds only the rows its
devices hold (`pipeline.local_rows`), so each process reads from storage exactly the records of
its share of each global batch, through one batched ArrayRecord read per batch. No process
reads the whole split for training. (Evaluation arrays, `tokenize_examples`, read every example
of the eval split on each process.)

When `source` is a directory that holds the release files, the prepared config is checked to
come from them (paths and sizes against the fingerprint stored at prepare time, no hashing); a
mismatch is an error, never old rows. Pass source="" to skip that check (e.g. on hosts that
have only the prepared copy).
"""

from __future__ import annotations

import os
from typing import Sequence

from jaxalign.data import pku_saferlhf as pku

from jaxalign.data import prepared as prepared_lib


def read_split(
    source: str, name: str, split: str, *, prepared_dir: str = ""
) -> tuple[Sequence[dict], pku.ValidationReport]:
    """Rows of one (config `name`, split): from the release files under `source`, or from the
    prepared ArrayRecord dataset in `prepared_dir` when it is set (see the module docstring).

    Raises FileNotFoundError naming the directory (and, for a prepared dir, the configs and
    splits it holds) when the config or split is not there; ValueError for a bad split name or a
    prepared config that was built from other source files.
    """
    pku.check_split_name(split)
    if not prepared_dir:
        if not source:
            raise ValueError("no data: set the release dir (config.data.source) or a prepared dir "
                             "(config.data.prepared_dir)")
        return pku.read_release(source, name, split)
    if not os.path.isdir(prepared_dir):
        raise FileNotFoundError(f"{prepared_dir}: prepared data dir does not exist "
                                f"(write it with `jaxalign data prepare --source DIR --data-dir {prepared_dir}`)")
    rows = prepared_lib.load_prepared(prepared_dir, name, split)
    if source and os.path.isdir(source):
        rows.check_source(source)
    return rows, rows.report()
