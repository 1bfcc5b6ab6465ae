"""Data pipeline throughput: prepare generated rows as ArrayRecord, then iterate tokenized batches.

    python experiments/benchmark_data.py [--rows 100000] [--batch-size 16] [--max-length 512]
        [--batches 300] [--workdir /tmp/jaxalign_bench_data] [--json out.json]

Stages timed: generating the release files (mini.write_mini), preparing them (validation with
sha256 + TFDS ArrayRecord writing), random-access reading of every prepared row, building the
views, and iterating `pipeline.make_batches` for each batch kind (host numpy batches, and global
jax.Arrays on a mesh of all local devices). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402

from jaxalign.data import mini, pipeline, views  # noqa: E402

from jaxalign.data import prepared as prepared_lib
from jaxalign.models import tokenizer as tk  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _iterate(kind, examples, tok, args, mesh):
    batches = pipeline.make_batches(kind, examples, tok, batch_size=args.batch_size, max_length=args.max_length,
                                    mesh=mesh, seed=0)
    first = next(batches)  # start-up (threads, first jit-free transfer) not timed
    jax.block_until_ready(first)
    real = 0
    start = time.perf_counter()
    for _ in tqdm.trange(args.batches, desc=f"{kind} batches", unit="batch", leave=False):
        batch = next(batches)
        jax.block_until_ready(batch)
        real += sum(int(np.asarray(v).sum()) for k, v in batch.items() if k.endswith("attention_mask"))
    seconds = time.perf_counter() - start
    sequences = sum(1 for k in first if k.endswith("input_ids"))
    padded = args.batches * args.batch_size * args.max_length * sequences
    return {
        "kind": kind,
        "mesh": "none" if mesh is None else f"{mesh.devices.size} device(s)",
        "batches_per_s": args.batches / seconds,
        "padded_tokens_per_s": padded / seconds,
        "real_tokens_per_s": real / seconds,
        "real_fraction": real / padded,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--workdir", default="/tmp/jaxalign_bench_data")
    parser.add_argument("--json", default=None, help="output JSON (default: WORKDIR/benchmark_data.json)")
    args = parser.parse_args(argv)

    work = pathlib.Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    results: dict = {"rows": args.rows, "batch_size": args.batch_size, "max_length": args.max_length,
                     "devices": jax.device_count(), "cpu_count": os.cpu_count(), "stages": {}}
    stages = results["stages"]

    _, t = _timed(lambda: mini.write_mini(work / "release", rows=args.rows, seed=0))
    stages["generate_rows_per_s"] = args.rows / t
    prepared, t = _timed(lambda: prepared_lib.prepare(work / "release", work / "tfds", "default"))
    n_prepared = sum(prepared["splits"].values())
    stages["prepare_rows_per_s"] = n_prepared / t
    stages["prepare_seconds"] = t

    source = prepared_lib.load_prepared(work / "tfds", "default", "train")
    rows, t = _timed(lambda: list(source))  # batched reads of 1024 rows
    stages["batched_read_rows_per_s"] = len(rows) / t
    picks = np.random.default_rng(0).integers(0, len(source), size=min(5000, len(source)))
    _, t = _timed(lambda: [source[int(i)] for i in picks])
    stages["random_access_rows_per_s"] = len(picks) / t

    texts = [x for r in rows[:20_000] for x in (r["prompt"], r["response_0"], r["response_1"])]
    tok, t = _timed(lambda: tk.train_bpe_tokenizer(texts, args.vocab_size, work / "tokenizer"))
    stages["tokenizer_train_seconds"] = t

    built, t = _timed(lambda: {
        "sft": views.sft_examples(rows),
        "preference": views.preference_examples(rows),
        "safety_preference": views.safety_preference_examples(rows, inconsistent="keep"),
        "prompt": views.prompt_examples(rows),
        "qa": views.qa_examples(rows),
    })
    stages["views_seconds"] = t

    mesh = jax.make_mesh((jax.device_count(), 1, 1), ("data", "fsdp", "tensor"))
    iteration = []
    for kind in ("sft", "preference", "safety_preference", "prompt", "qa"):
        iteration.append(_iterate(kind, built[kind], tok, args, None))
    iteration.append(_iterate("preference", built["preference"], tok, args, mesh))
    results["iteration"] = iteration

    print(f"\nrows {args.rows}  devices {jax.device_count()}  cpus {os.cpu_count()}")
    print(f"generate   {stages['generate_rows_per_s']:>10.0f} rows/s")
    print(f"prepare    {stages['prepare_rows_per_s']:>10.0f} rows/s  (validate + sha256 + ArrayRecord, "
          f"{stages['prepare_seconds']:.1f} s)")
    print(f"read       {stages['batched_read_rows_per_s']:>10.0f} rows/s  (all rows, batched reads, parsed)")
    print(f"read       {stages['random_access_rows_per_s']:>10.0f} rows/s  (one random row at a time, parsed)")
    print(f"views      {stages['views_seconds']:>10.2f} s for all five views")
    print(f"\n{'kind':<18s}{'mesh':<12s}{'batch/s':>9s}{'tok/s padded':>14s}{'tok/s real':>12s}{'real %':>8s}"
          f"   ({args.batch_size} x {args.max_length})")
    for r in iteration:
        print(f"{r['kind']:<18s}{r['mesh']:<12s}{r['batches_per_s']:>9.1f}{r['padded_tokens_per_s']:>14.0f}"
              f"{r['real_tokens_per_s']:>12.0f}{100 * r['real_fraction']:>7.1f}%")
    out = pathlib.Path(args.json or work / "benchmark_data.json")
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
