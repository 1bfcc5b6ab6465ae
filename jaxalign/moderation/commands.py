"""`jaxalign moderate --model DIR --input FILE.jsonl [--output OUT.jsonl] [--on-error skip|stop]`.

Input: one JSON object per line, either a (prompt, response) row {"prompt", "response", ...} or a
release row {"prompt", "response_0", "response_1", ...}, which gives two output rows (one per
answer, with "response_index" 0/1 and "response" set). Every output row keeps the input's fields
and adds is_safe, unsafe_probability, categories (the 19 names -> probability),
flagged_categories, severity and the truncation marks truncated, tokens_kept and response_cut
(jaxalign/moderation/api.py: a text longer than --max-length loses the start of its prompt first).

A malformed line (not UTF-8, not JSON, not an object, no string prompt, neither response nor
response_0/response_1 strings) is reported with FILE:LINE; --on-error skip (default) skips and
counts it (each one logged, the count in the summary), --on-error stop fails with that line before
any model is loaded. Blank lines are ignored. The output (default: INPUT with .moderated.jsonl) is
written to a temporary file and renamed when complete (jaxalign/files.py); an existing one is
refused unless --overwrite. A summary (rows, unsafe, truncated, response_cut, malformed, rows/s) is
printed as JSON.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import tqdm

from jaxalign import files
from jaxalign.evaluate.commands import mesh_from_args
from jaxalign.moderation import api

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="moderation model dir (WORKDIR/export of a moderation run)")
    parser.add_argument("--input", required=True, help="JSONL: (prompt, response) rows or release rows")
    parser.add_argument("--output", default="", help="output JSONL (default: INPUT with .moderated.jsonl)")
    parser.add_argument("--on-error", default="skip", choices=("skip", "stop"),
                        help="a malformed input line: skip and count it (default) or stop")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--batch-size", type=int, default=16, help="answers per forward")
    parser.add_argument("--max-length", type=int, default=0,
                        help="cut texts to this many tokens (0: the training length)")
    parser.add_argument("--tokenizer", default="", help="tokenizer dir (default: the model dir)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype")
    parser.add_argument("--config", default="",
                        help="config file whose config.mesh places the model (default: all devices)")


def parse_line(text: str) -> tuple[dict | None, list[tuple[dict, int | None, str]], str]:
    """One input line -> (row, [(row, response_index or None, response)], error message or "")."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [], f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(row, dict):
        return None, [], f"expected a JSON object, got {type(row).__name__}"
    if not isinstance(row.get("prompt"), str):
        return None, [], "no string field 'prompt'"
    if "response" in row:
        if not isinstance(row["response"], str):
            return None, [], "field 'response' is not a string"
        return row, [(row, None, row["response"])], ""
    if isinstance(row.get("response_0"), str) and isinstance(row.get("response_1"), str):
        return row, [(row, 0, row["response_0"]), (row, 1, row["response_1"])], ""
    return None, [], "needs a string 'response' or string 'response_0' and 'response_1' (release row)"


def read_input(path: pathlib.Path, on_error: str) -> tuple[list[tuple[dict, int | None, str]], list[str]]:
    """The answers to moderate, in order, and the malformed lines ("FILE:LINE: why")."""
    if not path.is_file():
        raise FileNotFoundError(f"--input {path} does not exist")
    answers, malformed = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                items, error = [], f"not UTF-8 (byte {e.start + 1})"
            else:
                if not text.strip():
                    continue
                _, items, error = parse_line(text)
            if error:
                message = f"{path}:{number}: {error}"
                if on_error == "stop":
                    raise ValueError(f"{message} (--on-error skip skips malformed lines)")
                log.warning("skipped %s", message)
                malformed.append(message)
                continue
            answers.extend(items)
    return answers, malformed


def output_row(row: dict, index: int | None, response: str, result: dict) -> dict:
    """The input row's fields (+ response_index/response for a release row) + the result's."""
    out = dict(row)
    if index is not None:
        out["response_index"] = index
        out["response"] = response
    out.update(result)
    return out


def run(args) -> int:
    path = pathlib.Path(args.input)
    default = path.with_name(path.name.removesuffix(".jsonl") + ".moderated.jsonl")
    output = pathlib.Path(args.output) if args.output else default
    files.check_new(output, args.overwrite, "--output")
    answers, malformed = read_input(path, args.on_error)
    mesh, rules = mesh_from_args(args)
    moderator = api.load_moderator(args.model, batch_size=args.batch_size, max_length=args.max_length or None,
                                   dtype=args.dtype, param_dtype=args.param_dtype, tokenizer_dir=args.tokenizer,
                                   mesh=mesh, rules=rules)
    counts = {"unsafe": 0, "truncated": 0, "response_cut": 0}
    start = time.perf_counter()
    with files.atomic_file(output, overwrite=args.overwrite, flag="--output") as tmp, \
            open(tmp, "w", encoding="utf-8") as f, \
            tqdm.tqdm(total=len(answers), unit="rows", desc="moderate") as bar:
        for begin in range(0, len(answers), moderator.batch_size):
            chunk = answers[begin:begin + moderator.batch_size]
            results = moderator.score_batch([(row["prompt"], response) for row, _, response in chunk])
            for (row, index, response), result in zip(chunk, results):
                counts["unsafe"] += not result["is_safe"]
                counts["truncated"] += result["truncated"]
                counts["response_cut"] += result["response_cut"]
                f.write(json.dumps(output_row(row, index, response, result), ensure_ascii=False) + "\n")
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    if counts["truncated"]:
        log.warning("%d of %d rows did not fit max_length=%d: their prompts were cut from the left (%d responses "
                    "were cut too: response_cut in %s)", counts["truncated"], len(answers), moderator.max_length,
                    counts["response_cut"], output)
    summary = {"output": str(output), "rows": len(answers), **counts, "malformed_lines": len(malformed),
               "seconds": round(seconds, 3), "rows_per_second": round(len(answers) / seconds, 2) if seconds else None}
    print(json.dumps(summary, indent=2))
    return 0


COMMANDS = {"moderate": (add_arguments, run)}
