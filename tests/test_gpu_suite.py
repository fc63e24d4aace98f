"""benchmarks/gpu_suite.py --quick, as CI runs it (on the CPU): every part is reported, ran or
skipped with a reason; a part that raises or hangs is recorded and the later parts still run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# Each test runs the suite in a subprocess, which runs every part in a process of its own
# (up to several minutes of caps under --quick): outside the everyday `-m "not slow"` subset.
pytestmark = pytest.mark.slow

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
PARTS = ["environment", "correctness", "attention", "extraction", "training", "distributed"]
RESULTS = {"PASS", "FAIL", "NOT MEASURED", "NOT JUDGED"}


def run_suite(out: Path, *args: str) -> tuple[dict, str, subprocess.CompletedProcess]:
    run = subprocess.run([sys.executable, str(SUITE), "--out", str(out), "--quick", *args],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((out / "gpu_suite.json").read_text())
    return report, (out / "gpu_suite.md").read_text(), run


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_suite(tmp_path_factory.mktemp("suite"))


def test_quick_reports_every_part_ran_or_skipped_with_a_reason(quick):
    report, md, _ = quick
    parts = {p["name"]: p for p in report["parts"]}
    assert [p["name"] for p in report["parts"]] == PARTS
    for p in parts.values():
        assert p["status"] in ("ok", "skipped"), (p["name"], p.get("error"), p.get("log_tail"))
        assert p["status"] == "ok" or p["reason"]
        assert f"## {p['title']}: {p['status']}" in md
    if not torch.cuda.is_available():
        assert parts["distributed"]["reason"].startswith("no CUDA")
        assert "skipped: no CUDA" in md
    assert report["suite"]["mode"] == "quick" and report["suite"]["finished"]
    assert parts["environment"]["info"]["torch"] == torch.__version__


def test_quick_cpu_miniatures_measure_their_rows(quick):
    report, md, _ = quick
    parts = {p["name"]: p for p in report["parts"]}
    # correctness: every backend row within tolerance (flex forward only on the CPU)
    rows = parts["correctness"]["tables"]["backends against float64 dense"]
    assert {r["backend"] for r in rows} == {"flex", "blocked", "dense"} and all(r["ok"] for r in rows)
    assert parts["correctness"]["values"]["backends_agree"] is True
    # the Spool head and its full / factorized references agree with float64 dense per backend
    heads = parts["correctness"]["tables"]["heads"]
    assert {r["head"] for r in heads} == {"spool", "full", "factorized"}
    assert all(r["ok"] if "ok" in r else r["status"] == "no CPU backward" for r in heads), heads
    # attention: all four backends timed at each T
    times = parts["attention"]["tables"]["times"]
    assert {r["backend"] for r in times} == {"flex", "blocked", "dense", "sdpa-full"}
    assert all(r["fwd_ms"] > 0 for r in times)
    extraction = parts["extraction"]["tables"]["frames/s"][0]
    assert extraction["failed"] == 0 and extraction["backbone_only"] > 0 and extraction["extract_run"] > 0
    train = parts["training"]["tables"]
    assert any(r.get("steady_steps_s") for r in train["train-head"]) and train["ablate"][0]["separate_processes_s"] > 0


def test_quick_lists_every_goal_without_judging_it(quick):
    report, md, _ = quick
    assert len(report["goals"]) == 8
    assert {g["result"] for g in report["goals"]} == {"NOT JUDGED"}  # miniature sizes prove nothing
    assert "## Goals" in md and "flex fwd+bwd speed-up over dense SDPA with the mask, T=32" in md


def test_a_failing_and_a_hanging_part_are_recorded_and_later_parts_still_run(tmp_path):
    t0 = time.monotonic()
    report, md, run = run_suite(tmp_path, "--only", "correctness", "distributed", "--fail-part", "environment",
                                "--hang-part", "correctness", "--cap", "correctness=3")  # fmt: skip
    parts = {p["name"]: p for p in report["parts"]}
    assert parts["environment"]["status"] == "failed"
    assert "injected failure" in parts["environment"]["error"] and "RuntimeError" in parts["environment"]["log_tail"]
    assert parts["correctness"]["status"] == "timeout" and "3 s cap" in parts["correctness"]["reason"]
    assert "## 1. Correctness on CUDA: timeout" in md
    # the last part ran after both (on the CPU it reports itself skipped: no CUDA)
    assert parts["distributed"]["status"] in ("ok", "skipped") and parts["distributed"]["seconds"] is not None
    assert parts["distributed"].get("reason") != "not selected (--only)"
    for name in ("attention", "extraction", "training"):
        assert parts[name]["status"] == "skipped" and parts[name]["reason"] == "not selected (--only)"
    assert time.monotonic() - t0 < 120  # the hung part was stopped at its cap, not waited for
