"""metrics.jsonl survives a kill mid-write: a torn last line is dropped (and counted, with a warning
naming the file); a malformed line before it is one error naming FILE:LINE."""

import json

import pytest

from jaxalign.train import metrics as metrics_lib


def _write_lines(path, records, tail=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)


RECORDS = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": float("nan")}]


@pytest.mark.parametrize(
    "tail",
    [b'{"step": 4, "lo', b'{"step": 4, "loss": 1.2', b"\x00" * 37, b'{"step": 4, "loss": 1.\xc3'],
    ids=["cut-in-key", "cut-before-brace", "nul-filled", "cut-in-utf8"],
)
def test_torn_last_line_is_dropped_and_counted(tmp_path, caplog, tail):
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, RECORDS, tail)
    with caplog.at_level("WARNING"):
        records = metrics_lib.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert f"{path}:4: dropped a torn last line" in caplog.text
    assert metrics_lib.parse_metrics_file(path)[1] == 1
    _write_lines(path, RECORDS)
    assert metrics_lib.parse_metrics_file(path) == (metrics_lib.read_metrics(tmp_path), 0)


def test_malformed_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(metrics_lib.MetricsFileError, match=rf"^{path}:2: not a metrics record"):
        metrics_lib.read_metrics(tmp_path)
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(metrics_lib.MetricsFileError, match=rf"{path}:2: .*expected a JSON object"):
        metrics_lib.read_metrics(tmp_path)
    path.write_text('{"loss": 1}\n{"step": 3}\n')
    with pytest.raises(metrics_lib.MetricsFileError, match=rf'{path}:1: .*no integer "step"'):
        metrics_lib.read_metrics(tmp_path)


def test_resume_after_a_torn_line_truncates_and_appends_cleanly(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, RECORDS, b'{"step": 4, "lo')
    writer = metrics_lib.MetricWriter(tmp_path, tensorboard=False)
    writer.truncate_after(2)  # the restored checkpoint covers steps <= 2
    writer.write(3, {"loss": 1.25})
    writer.write(4, {"loss": 1.0})
    writer.close()
    records, dropped = metrics_lib.parse_metrics_file(path)
    assert dropped == 0 and [(r["step"], r["loss"]) for r in records] == [(1, 2.0), (2, 1.5), (3, 1.25), (4, 1.0)]


def test_writer_never_glues_a_record_onto_a_torn_line(tmp_path):
    """Even without truncate_after, a new record starts on its own line."""
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, RECORDS[:2], b'{"step": 3, "lo')
    writer = metrics_lib.MetricWriter(tmp_path, tensorboard=False)
    writer.write(3, {"loss": 1.0})
    writer.close()
    records, dropped = metrics_lib.parse_metrics_file(path)
    assert dropped == 0 and [r["step"] for r in records] == [1, 2, 3]


def test_curves_command_reads_a_torn_file(tmp_path, caplog):
    """`jaxalign evaluate curves` reads through read_metrics: a torn tail does not block it."""
    from jaxalign.evaluate import curves

    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    keys = ("reward", "cost", "lambda", "kl_divergence")
    _write_lines(path, [{"step": s, **{k: 0.1 * s for k in keys}} for s in (1, 2, 3)], b'{"step": 4, "rew')
    with caplog.at_level("WARNING"):
        runs = curves.load_runs([str(tmp_path / "run")])
    assert [r["step"] for r in runs["run"]] == [1, 2, 3]
    assert "torn last line" in caplog.text
    assert curves.summarize(runs["run"], window=1)["iterations"] == 3
