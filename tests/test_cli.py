"""The `fairpatch` command line, run as a user runs it: a real process."""

import json
import subprocess
import sys
from pathlib import Path

import onnx

EXE = [sys.executable, "-m", "clients"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=timeout)


def test_bench_eraser_json_has_every_field_the_checks_read():
    p = run("bench", "eraser", "--dataset", "german", "--sensitive", "age", "--criterion", "dp",
            "--queries", "120", "--seed", "0", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout[p.stdout.index("{"):])
    for side in ("before", "after"):
        assert set(r[side]) >= {"accuracy", "balanced_accuracy", "dp_diff", "eo_diff", "worst_group_accuracy"}
        assert all(0.0 <= v <= 1.0 for k, v in r[side].items() if k not in ("spd", "aod", "eod"))
    assert 0 < r["queries_used"] <= 120
    assert r["group_at_inference"] is True and r["fit_seconds"] > 0


def test_bench_table_and_bad_arguments():
    p = run("bench", "eraser", "--dataset", "german", "--queries", "100", "--group-free")
    assert p.returncode == 0, p.stderr
    assert "dp_diff" in p.stdout and "group at inference: no" in p.stdout
    p = run("bench", "eraser", "--dataset", "german", "--queries", "2")
    assert p.returncode == 2 and "too small" in p.stderr
    p = run("bench", "eraser", "--dataset", "mnist")
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_model_train_writes_onnx_and_metadata(tmp_path: Path):
    out = tmp_path / "german.onnx"
    p = run("model", "train", "german", "--out", str(out))
    assert p.returncode == 0, p.stderr
    m = onnx.load(str(out))
    assert m.opset_import[0].version == 17  # what onnx2torch converts
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
    meta = json.loads(out.with_suffix(".json").read_text())
    width = m.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    assert meta["dataset"] == "german" and len(meta["feature_names"]) == width


def test_clients_import_without_torch():
    code = "import sys, clients.cli; clients.cli.build_parser(); print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def test_a_job_without_a_held_out_report_is_summarised(capsys):
    """holdout 0 (or eval_budget 0): the gateway's result has before/after null; the SDK reads it and the CLI says
    there is no report instead of failing on it."""
    from clients.commands import _job_summary
    from clients.sdk import Job

    job = Job.model_validate({"id": "j1", "status": "succeeded", "model": "m", "version": "1", "result": {
        "patch_id": "p1", "queries_used": 300, "eval_queries": 0, "before": None, "after": None,
        "note": "no held-out report: holdout 0 or eval_budget 0 left no row to score the patch on"}})
    assert _job_summary(job) == 0
    out = capsys.readouterr().out
    assert "no held-out report" in out and "fairpatch patches activate m p1" in out
