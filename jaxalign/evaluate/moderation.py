"""Moderation evaluation: one jitted scorer, the decision rule, every metric (numpy), the report.

    arrays, _ = pipeline.tokenize_examples("qa", views.qa_examples(rows), tokenizer, max_length=L)
    scores = make_scorer(module, mesh, rules)(params, arrays, batch_size=16, threshold=head.threshold)
    report = moderation_report(scores, arrays, head)          # JSON-able dict (below)
    write_outputs(out_dir, scores, arrays, report)              # metrics.json, roc_curve.png, pr_curve.png, ...

Unsafe is the positive class (the guard-model convention). The decision rule (`decide`, shared
with `jaxalign moderate`): unsafe iff P(unsafe) >= threshold; a safe verdict has severity 0 and no
category; an unsafe one has severity 1 + argmax P(severity 1..3) and the categories whose P reaches
their threshold (the head's category_thresholds, chosen on validation data, else its
category_threshold), at least the most probable one. Metrics:

  * unsafe: precision, recall, F1, accuracy at the threshold; AUROC and average precision
    (sum_k (R_k - R_k-1) P_k over the distinct scores, high to low); ECE of P(unsafe): 10 equal-width
    bins [i/10, (i+1)/10) (the last closed), sum_b |b|/N |mean(y in b) - mean(p in b)|;
  * categories: per category F1 = 2TP/(2TP+FP+FN), precision, recall, support (positives);
    macro F1 = the mean over categories whose F1 is defined (a positive or a prediction; others are
    reported as null); micro F1 from the pooled TP/FP/FN;
  * severity: accuracy and the 4x4 confusion matrix (rows = label, columns = decision);
  * streaming: a response prefix is flagged when its per-token P(unsafe) >= threshold; for unsafe
    answers the first flagged response token (0-based offset from the response start; mean,
    median, and the mean fraction of the answer read) and the share ever flagged; for safe
    answers the false-alarm rate = the share with any flagged prefix.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxalign import files
from jaxalign.parallel import mesh as mesh_lib

NUM_ECE_BINS = 10

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Scoring


def make_scorer(module, mesh: jax.sharding.Mesh, rules):
    """A scorer with one jitted forward (compiled once per shape):

    scorer(params, arrays, *, batch_size, threshold=0.5, max_batches=-1, per_token=False) -> dict of numpy:
      unsafe [n], categories [n, C], severity [n, S] (end-token probabilities) and, when arrays
      has response_mask, first_flag [n] int32 (offset of the first response token with
      P(unsafe) >= threshold, -1 if none) and response_length [n]; with per_token, stream [n, L]:
      the streaming head's P(unsafe | prefix) at every position (0 off the response).
    arrays: input_ids, attention_mask [N, L] (+ response_mask). The last batch is completed with
    copies of the last row (dropped), so every row is scored once at one static shape.
    """
    in_sharding = mesh_lib.batch_sharding(mesh, 2)

    def forward(params, ids, mask, response_mask, threshold):
        out = module.apply({"params": params}, ids, attention_mask=mask)
        flagged = (jax.nn.sigmoid(out.unsafe_logits) >= threshold) & response_mask
        offset = jnp.cumsum(response_mask.astype(jnp.int32), axis=1) - 1  # response-token offset
        first = jnp.min(jnp.where(flagged, offset, jnp.iinfo(jnp.int32).max), axis=1)
        return {
            "unsafe": jax.nn.sigmoid(out.end_unsafe_logits),
            "categories": jax.nn.sigmoid(out.end_category_logits),
            "severity": jax.nn.softmax(out.end_severity_logits, axis=-1),
            "first_flag": jnp.where(jnp.any(flagged, axis=1), first, -1),
            "response_length": jnp.sum(response_mask.astype(jnp.int32), axis=1),
            "stream": jnp.where(response_mask, jax.nn.sigmoid(out.unsafe_logits), 0.0),
        }

    jitted = jax.jit(forward, out_shardings=mesh_lib.replicated(mesh))

    def scorer(params, arrays: dict[str, np.ndarray], *, batch_size: int, threshold: float = 0.5,
               max_batches: int = -1, per_token: bool = False) -> dict[str, np.ndarray]:
        total = len(arrays["input_ids"])
        num_batches = -(-total // batch_size)
        if max_batches >= 0:
            num_batches = min(num_batches, max_batches)
        stream = "response_mask" in arrays
        parts: dict[str, list] = {}
        with mesh_lib.sharding_context(mesh, rules):
            for i in tqdm.trange(num_batches, desc="moderation scores", unit="batch", leave=False,
                                 disable=jax.process_index() != 0):
                rows = np.minimum(np.arange(i * batch_size, (i + 1) * batch_size), total - 1)
                put = lambda x: mesh_lib.put_sharded(np.asarray(x[rows]), in_sharding)  # noqa: E731
                response = arrays["response_mask"] if stream else np.zeros_like(arrays["attention_mask"])
                out = jax.device_get(jitted(params, put(arrays["input_ids"]), put(arrays["attention_mask"]),
                                            put(response), jnp.float32(threshold)))
                keep = min(batch_size, total - i * batch_size)
                for key, value in out.items():
                    parts.setdefault(key, []).append(np.asarray(value)[:keep])
        scores = {key: np.concatenate(value) for key, value in parts.items()}
        if not stream:
            scores.pop("first_flag"), scores.pop("response_length")
        if not (stream and per_token):
            scores.pop("stream")
        return scores

    scorer.forward = jitted  # (params, ids, mask, response_mask, threshold): the step jaxalign.plan compiles
    return scorer


def decide(unsafe: np.ndarray, categories: np.ndarray, severity: np.ndarray, threshold: float,
           category_threshold: float | np.ndarray = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The decision rule (module docstring): unsafe [N], categories [N, C], severity [N, S]
    probabilities, category_threshold [] or [C] -> (is_unsafe [N] bool, flagged [N, C] bool,
    severity [N] int)."""
    is_unsafe = np.asarray(unsafe) >= threshold
    categories = np.asarray(categories)
    flagged = (categories >= category_threshold) & is_unsafe[:, None]
    none = is_unsafe & ~flagged.any(axis=1)
    flagged[np.flatnonzero(none), np.argmax(categories[none], axis=1)] = True
    level = np.where(is_unsafe, 1 + np.argmax(np.asarray(severity)[:, 1:], axis=1), 0)
    return is_unsafe, flagged, level.astype(np.int64)


# ---------------------------------------------------------------------------------------
# Metrics (numpy)


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0


def binary_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """labels, predicted [N] bool (True = unsafe) -> precision, recall, f1, accuracy, counts."""
    y, p = np.asarray(labels, bool), np.asarray(predicted, bool)
    tp, fp, fn = int(np.sum(y & p)), int(np.sum(~y & p)), int(np.sum(y & ~p))
    tn = len(y) - tp - fp - fn
    return {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "accuracy": _ratio(tp + tn, len(y)), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _ranked(labels: np.ndarray, scores: np.ndarray):
    """Cumulative TP/FP when predicting score >= each distinct score (high to low)."""
    y, s = np.asarray(labels, bool), np.asarray(scores, np.float64)
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last].astype(np.float64)
    fp = (last + 1 - tp).astype(np.float64)
    return s[last], tp, fp


def best_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The threshold t (predict positive iff score >= t) with the highest F1 -> (t, F1).

    Among the distinct scores s_k giving the highest F1 the highest wins; t is then the midpoint
    between it and the next lower distinct score (the same predictions on these rows, F1 unchanged,
    but the widest margin on both sides: on separable data the middle of the gap between the
    lowest positive and the highest negative). No positive or no row: (0.5, 0.0)."""
    y = np.asarray(labels, bool)
    if len(y) == 0 or not y.any():
        return 0.5, 0.0
    thresholds, tp, fp = _ranked(y, scores)
    f1 = 2 * tp / (2 * tp + fp + (y.sum() - tp))
    best = int(np.argmax(f1))  # thresholds run high to low: argmax picks the highest among ties
    t = thresholds[best] if best + 1 == len(thresholds) else (thresholds[best] + thresholds[best + 1]) / 2
    return float(t), float(f1[best])


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(fpr, tpr) from (0, 0) over the distinct scores high to low, and the AUROC (trapezoid);
    nan AUROC when one class is missing."""
    y = np.asarray(labels, bool)
    _, tp, fp = _ranked(y, scores)
    pos, neg = y.sum(), len(y) - y.sum()
    if pos == 0 or neg == 0:
        return np.zeros(1), np.zeros(1), float("nan")
    tpr, fpr = np.r_[0.0, tp / pos], np.r_[0.0, fp / neg]
    return fpr, tpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(recall, precision) over the distinct scores high to low, and the average precision
    sum_k (R_k - R_{k-1}) P_k (R_0 = 0); nan when there is no positive."""
    y = np.asarray(labels, bool)
    _, tp, fp = _ranked(y, scores)
    if y.sum() == 0:
        return np.zeros(1), np.ones(1), float("nan")
    recall, precision = tp / y.sum(), tp / (tp + fp)
    return recall, precision, float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, num_bins: int = NUM_ECE_BINS) -> float:
    """ECE of binary probabilities (module docstring): labels [N] bool, probs [N] in [0, 1]."""
    y, p = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    if len(y) == 0:
        return 0.0
    bins = np.minimum((p * num_bins).astype(np.int64), num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins)
    gap = np.abs(np.bincount(bins, y, num_bins) - np.bincount(bins, p, num_bins))  # |sum y - sum p| per bin
    return float(np.sum(gap[counts > 0]) / len(y))


def category_metrics(labels: np.ndarray, predicted: np.ndarray, names) -> dict[str, Any]:
    """labels, predicted [N, C] bool -> {"per_category": {name: {f1, precision, recall, support}},
    "macro_f1", "micro_f1"} (F1 None where a category has neither a positive nor a prediction)."""
    y, p = np.asarray(labels, bool), np.asarray(predicted, bool)
    tp, fp, fn = np.sum(y & p, 0), np.sum(~y & p, 0), np.sum(y & ~p, 0)
    per = {}
    defined = []
    for c, name in enumerate(names):
        denominator = 2 * tp[c] + fp[c] + fn[c]
        f1 = None if denominator == 0 else float(2 * tp[c] / denominator)
        if f1 is not None:
            defined.append(f1)
        per[name] = {"f1": f1, "precision": _ratio(tp[c], tp[c] + fp[c]), "recall": _ratio(tp[c], tp[c] + fn[c]),
                     "support": int(tp[c] + fn[c])}
    micro = _ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())
    return {"per_category": per, "macro_f1": float(np.mean(defined)) if defined else 0.0, "micro_f1": micro}


def severity_metrics(labels: np.ndarray, predicted: np.ndarray, num_severities: int) -> dict[str, Any]:
    """labels, predicted [N] int -> accuracy and confusion [S][S] (rows = label, columns = prediction)."""
    y, p = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    confusion = np.zeros((num_severities, num_severities), np.int64)
    np.add.at(confusion, (y, p), 1)
    return {"accuracy": _ratio(np.trace(confusion), len(y)), "confusion": confusion.tolist()}


def streaming_metrics(unsafe_labels: np.ndarray, first_flag: np.ndarray, response_length: np.ndarray) -> dict:
    """unsafe_labels [N] bool, first_flag [N] (-1 = never flagged), response_length [N] -> the
    streaming metrics of the module docstring."""
    y = np.asarray(unsafe_labels, bool)
    first, length = np.asarray(first_flag), np.asarray(response_length)
    flagged_unsafe = y & (first >= 0)
    offsets = first[flagged_unsafe]
    read = (offsets + 1) / np.maximum(length[flagged_unsafe], 1)
    return {
        "unsafe_flagged_rate": _ratio(flagged_unsafe.sum(), y.sum()),
        "first_flag_token_mean": float(offsets.mean()) if offsets.size else None,
        "first_flag_token_median": float(np.median(offsets)) if offsets.size else None,
        "first_flag_fraction_read_mean": float(read.mean()) if read.size else None,
        "false_alarm_rate": _ratio(np.sum(~y & (first >= 0)), np.sum(~y)),
        "unsafe_answers": int(y.sum()),
        "safe_answers": int((~y).sum()),
    }


def moderation_report(scores: dict[str, np.ndarray], arrays: dict[str, np.ndarray], head) -> dict[str, Any]:
    """Every metric of the module docstring for scored rows (scorer output) against the labels of
    `arrays` (is_safe, categories, severity), with head.threshold / category_threshold /
    category_names. Rows beyond len(scores["unsafe"]) are ignored."""
    n = len(scores["unsafe"])
    unsafe_labels = ~np.asarray(arrays["is_safe"][:n], bool)
    is_unsafe, flagged, level = decide(scores["unsafe"], scores["categories"], scores["severity"], head.threshold,
                                       head.category_cutoffs())
    _, _, auroc = roc_curve(unsafe_labels, scores["unsafe"])
    _, _, average_precision = pr_curve(unsafe_labels, scores["unsafe"])
    unsafe = binary_metrics(unsafe_labels, is_unsafe)
    unsafe.update(auroc=auroc, average_precision=average_precision,
                  ece=expected_calibration_error(unsafe_labels, scores["unsafe"]), positives=int(unsafe_labels.sum()))
    report = {
        "examples": n, "threshold": float(head.threshold), "category_thresholds": head.category_cutoffs().tolist(),
        "unsafe": unsafe,
        "categories": category_metrics(arrays["categories"][:n], flagged, head.category_names),
        "severity": severity_metrics(arrays["severity"][:n], level, head.num_severities),
    }
    if "first_flag" in scores:
        report["streaming"] = streaming_metrics(unsafe_labels, scores["first_flag"], scores["response_length"])
    return report


def summary(report: dict[str, Any]) -> dict[str, float]:
    """The scalar headline metrics of a report (for training logs): unsafe F1/precision/recall/
    accuracy/AUROC/ECE, macro/micro category F1, severity accuracy, streaming rates."""
    out = {f"unsafe_{k}": report["unsafe"][k] for k in ("f1", "precision", "recall", "accuracy", "auroc", "ece")}
    out["category_macro_f1"] = report["categories"]["macro_f1"]
    out["category_micro_f1"] = report["categories"]["micro_f1"]
    out["severity_accuracy"] = report["severity"]["accuracy"]
    if "streaming" in report:
        out["stream_false_alarm_rate"] = report["streaming"]["false_alarm_rate"]
        out["stream_unsafe_flagged_rate"] = report["streaming"]["unsafe_flagged_rate"]
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


# ---------------------------------------------------------------------------------------
# Files


def _plot(path: pathlib.Path, x: np.ndarray, y: np.ndarray, title: str, xlabel: str, ylabel: str,
          diagonal: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(x, y, color="tab:red", drawstyle="steps-post" if not diagonal else "default")
    if diagonal:
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(out_dir, scores: dict[str, np.ndarray], arrays: dict[str, np.ndarray], report: dict) -> list[str]:
    """OUT/metrics.json (the report), scores.npz (the probabilities), roc_curve.png, pr_curve.png.
    -> file names."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(scores["unsafe"])
    labels = ~np.asarray(arrays["is_safe"][:n], bool)
    (out / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    np.savez(out / "scores.npz", **scores)
    fpr, tpr, auroc = roc_curve(labels, scores["unsafe"])
    _plot(out / "roc_curve.png", fpr, tpr, f"ROC, unsafe = positive (AUROC {auroc:.3f})", "false positive rate",
          "true positive rate", diagonal=True)
    recall, precision, ap = pr_curve(labels, scores["unsafe"])
    _plot(out / "pr_curve.png", recall, precision, f"Precision-recall, unsafe (AP {ap:.3f})", "recall", "precision")
    return ["metrics.json", "scores.npz", "roc_curve.png", "pr_curve.png"]


# ---------------------------------------------------------------------------------------
# `jaxalign evaluate moderation`


def add_arguments(parser) -> None:
    """Arguments of `jaxalign evaluate moderation`."""
    parser.add_argument("--model", required=True, help="moderation model dir (WORKDIR/export of a moderation run)")
    parser.add_argument("--data", required=True, help="release-layout dataset dir (data/<Model>/{train,test}.jsonl)")
    parser.add_argument("--out", required=True,
                        help="output dir: metrics.json, scores.npz, roc_curve.png, pr_curve.png")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--name", default="default", help="dataset config: default, alpaca-7b, ... (default: default)")
    parser.add_argument("--tokenizer", default="", help="tokenizer dir (default: the model dir)")
    parser.add_argument("--max-length", type=int, default=0, help="pad/cut to this length (0: the training length)")
    parser.add_argument("--batch-size", type=int, default=16, help="answers per forward")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype")
    parser.add_argument("--prepared-dir", default="", help="read --data's split from this TFDS-prepared dir")
    parser.add_argument("--config", default="", help="config file whose config.mesh places the model "
                        "(--config.mesh.* overrides allowed); default: all devices, FSDP")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def score_split(model_dir: str, data: str, split: str, mesh, rules, *, name: str = "default", tokenizer_dir: str = "",
                max_length: int = 0, batch_size: int = 16, dtype: str = "float32", param_dtype: str = "float32",
                prepared_dir: str = "", per_token: bool = False):
    """Every QA answer of a release split scored by a moderation export at its saved threshold
    (per_token: also the streaming head's per-position P(unsafe), make_scorer's "stream").

    -> (scores of make_scorer, the tokenized QA arrays, the release rows, the ModerationHead, the
    split's read report); the answers are views.qa_examples' order (response_0, response_1 per row).
    """
    from jaxalign.data import pipeline, sources, views
    from jaxalign.models import loading
    from jaxalign.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    model = loading.load_moderation_model(loading.ModelSettings(init_path=model_dir, dtype=dtype,
                                                                param_dtype=param_dtype), mesh, rules,
                                          min_vocab_size=len(tokenizer))
    head = model.head
    template = views.chat_template(tokenizer) if head.prompt_template == "chat" else head.prompt_template
    rows, source_report = sources.read_split(data, name, split, prepared_dir=prepared_dir)
    examples = views.qa_examples(rows, template=template)
    arrays, _ = pipeline.tokenize_examples("qa", examples, tokenizer, max_length=max_length or head.max_length)
    shards = int(mesh.shape["data"] * mesh.shape["fsdp"])
    batch_size = -(-max(1, batch_size) // shards) * shards
    scores = make_scorer(model.module, mesh, rules)(model.params, arrays, batch_size=batch_size,
                                                    threshold=head.threshold, per_token=per_token)
    return scores, arrays, rows, head, source_report


def evaluate(args) -> dict:
    """Scores every QA answer of the split with the saved threshold; writes the files; -> report."""
    from jaxalign import config as config_lib

    files.check_new(args.out, args.overwrite)
    mesh, rules = mesh_lib.mesh_and_rules(config_lib.mesh_settings(args.config, args.extra_args))
    scores, arrays, _, head, source_report = score_split(
        args.model, args.data, args.split, mesh, rules, name=args.name, tokenizer_dir=args.tokenizer,
        max_length=args.max_length, batch_size=args.batch_size, dtype=args.dtype, param_dtype=args.param_dtype,
        prepared_dir=args.prepared_dir)
    report = moderation_report(scores, arrays, head)
    report["data"] = {"source": str(args.data), "split": args.split, "name": args.name, "rows": str(source_report)}
    if jax.process_index() == 0:
        with files.atomic_dir(args.out, overwrite=args.overwrite) as tmp:
            written = write_outputs(tmp, scores, arrays, report)
        log.info("wrote %s", ", ".join(f"{args.out}/{name}" for name in written))
    return report


def run_command(args) -> int:
    """`jaxalign evaluate moderation`: prints the report's headline metrics as JSON."""
    report = evaluate(args)
    print(json.dumps(dict(summary(report), threshold=report["threshold"]), indent=2, sort_keys=True))
    return 0
