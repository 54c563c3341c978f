"""benchmarks/gateway_overhead.py --targets in smoke mode: each target starts, answers what it should and gets
a row per cell with its CPU per request. Figures are not checked against any threshold (a few requests on a
shared machine measure nothing); what is checked is that every target was measured and that the zero-hop
model answers what the gateway answers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks import overhead_targets
from benchmarks.gateway_overhead import ANSWER_TOLERANCE, CHECK_ROWS, answers_problem, main, zero_hop_body
from tests import peer_envs

SMOKE_CELLS = {(1, 1), (1, 2), (8, 1), (8, 2)}  # (batch, concurrency) of --smoke
HAS_NGINX = overhead_targets.NGINX.is_file()


def _run(tmp_path: Path, targets: str) -> dict:
    out = tmp_path / "run.json"
    md = tmp_path / "overhead.md"
    assert main(["--smoke", "--targets", targets, "--legs", "json", "--json", str(out), "--markdown", str(md)]) == 0
    run = json.loads(out.read_text())
    run["markdown"] = md.read_text()
    return run


def _measured(run: dict, target: str) -> None:
    cells = [c for c in run["cells"] if c["target"] == target]
    assert {(c["batch"], c["concurrency"]) for c in cells} == SMOKE_CELLS, target
    for c in cells:
        assert c["requests"] > 0 and c["errors"] == 0, c
        assert c["own_cpu_ms"] > 0, c  # summed over the target's processes (nginx: master + worker)


def test_smoke_run_measures_the_cheap_targets_and_zero_hop_answers_as_the_gateway(tmp_path):
    run = _run(tmp_path, "direct,bare,patched-floor,nginx,zero-hop,gateway")
    targets = ["direct", "floor", "patched-floor", "zero-hop", "gateway", *(["nginx"] if HAS_NGINX else [])]
    for target in targets:
        _measured(run, target)
    if not HAS_NGINX:
        assert "nginx" in run["skipped"]
    assert "kserve" not in {c["target"] for c in run["cells"]}  # not asked for

    answers = {t: np.asarray(v) for t, v in run["answers"].items()}
    assert len(answers["zero-hop"]) == 2 * CHECK_ROWS  # [N, 2] logits
    np.testing.assert_allclose(answers["zero-hop"], answers["gateway"], rtol=0, atol=ANSWER_TOLERANCE)
    np.testing.assert_allclose(answers["patched-floor"], answers["gateway"], rtol=0, atol=ANSWER_TOLERANCE)
    assert not np.allclose(answers["zero-hop"], answers["direct"])  # the patch changes the answers
    for proxy in ("floor", "nginx"):
        if proxy in answers:
            np.testing.assert_array_equal(answers[proxy], answers["direct"])

    md = run["markdown"]
    assert "### Every target side by side, same rounds" in md
    assert "zero-hop, batch 1, concurrency 1: CPU" in md
    assert "fairpatch gateway, JSON leg, batch 1, concurrency 1: CPU" in md
    assert "patched floor, batch 1, concurrency 1: CPU" in md


def test_zero_hop_without_a_gateway_leg_is_checked_against_the_patch_applied_offline(tmp_path):
    """With no gateway leg measured, zero-hop's answers are checked against the gateway's own function applied
    to direct's scores (the run would stop with an error where they differ)."""
    run = _run(tmp_path, "direct,zero-hop")
    answers = {t: np.asarray(v) for t, v in run["answers"].items()}
    assert "gateway" not in answers
    np.testing.assert_allclose(answers["zero-hop"], answers["gateway, offline"], rtol=0, atol=ANSWER_TOLERANCE)
    assert not np.allclose(answers["gateway, offline"], answers["direct"])
    assert answers_problem({"zero-hop": [0.0, 1.0], "gateway, offline": [0.0, 1.1]}).startswith(
        "zero-hop and gateway, offline answers differ")


def test_smoke_run_measures_the_kserve_transformer(tmp_path):
    peer_envs.require("kserve")  # builds its virtualenv once (cached), or skips with the reason
    run = _run(tmp_path, "direct,kserve")
    _measured(run, "kserve")
    np.testing.assert_array_equal(run["answers"]["kserve"], run["answers"]["direct"])
    assert {c["target"] for c in run["cells"]} == {"direct", "kserve"}  # the gateway started, not measured


def test_targets_are_parsed_in_the_rounds_order_with_direct_always():
    assert overhead_targets.parse_targets("gateway,nginx,floor") == ["direct", "bare", "nginx", "gateway"]
    assert overhead_targets.parse_targets("patched-floor,bare") == ["direct", "bare", "patched-floor"]
    with pytest.raises(ValueError, match="triton"):
        overhead_targets.parse_targets("direct,triton")


def test_a_missing_nginx_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(overhead_targets, "NGINX", tmp_path / "no-nginx")
    with pytest.raises(overhead_targets.TargetUnavailable, match="no nginx at"):
        overhead_targets.nginx_command(tmp_path, 1, 2)


@pytest.mark.skipif(not HAS_NGINX, reason=f"no nginx at {overhead_targets.NGINX}")
def test_the_nginx_config_is_valid(tmp_path):
    cmd = overhead_targets.nginx_command(tmp_path / "nginx", 18080, 18000)
    done = subprocess.run([*cmd[:-2], "-t"], capture_output=True, text=True, timeout=60)  # -t: test the config
    assert done.returncode == 0, done.stderr
    conf = (tmp_path / "nginx" / "nginx.conf").read_text()
    assert "worker_processes 1;" in conf and "keepalive 64;" in conf and "access_log off;" in conf


def test_zero_hop_body_adds_the_group_ids_only_where_the_patch_needs_them():
    class Patch:
        group_at_inference = True

    X = np.zeros((2, 3), dtype=np.float32)
    with_group = json.loads(zero_hop_body(X, np.array([1, 0]), Patch()))
    assert with_group["inputs"][1] == {"name": "group", "shape": [2], "datatype": "INT64", "data": [1, 0]}
    Patch.group_at_inference = False
    assert [i["name"] for i in json.loads(zero_hop_body(X, np.array([1, 0]), Patch()))["inputs"]] == ["input"]
