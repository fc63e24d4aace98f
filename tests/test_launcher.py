"""The submitit launcher (spool.launcher): one cluster job per run.

Real jobs run through submitit's local executor (one Python process per run, as a Slurm node
would start it) and must give the local launcher's results. What needs Slurm itself (the
sbatch script, Slurm's job states, re-attaching by job id) runs against a fake Slurm: `srun`,
`sbatch` and `sacct` scripts on PATH that record the submissions and report the states a
test writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_ablate import BASE, read_csv, store  # noqa: F401  (store: the same tiny feature store)
from typer.testing import CliRunner

import spool.launcher
from spool.ablate import TIMING_COLUMNS, load_grid, plan_ablation, run_ablation
from spool.cli.app import app
from spool.grid import GridError, LauncherConfig, parse_grid
from spool.launcher import LauncherError, RunJob, executor_parameters

import submitit  # noqa: E402  (in the test extra: a missing submitit fails, it is not skipped)

LOCAL = {"name": "submitit", "cluster": "local", "cpus-per-job": 1, "gpus-per-job": 0, "time": 5}
GRID = {  # 3 runs: two cells and a baseline, one epoch each
    "base": {**BASE, "epochs": 1},
    "grid": {"lookahead": [0, 1]},
    "seeds": [0],
    "baselines": ["mean-linear"],
    "workers": 0,
    "device": "cpu",
}


def write_grid(path: Path, store: str, out: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({"store": store, "out": str(out), **GRID, **changes}, sort_keys=False))
    return path


def job_ids(out: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["job_id"] for p in sorted((out / "runs").glob("*/job.json"))}


def train_losses(out: Path) -> dict[str, list[float]]:
    return {
        p.parent.name: [e["train_loss"] for e in json.loads(p.read_text())["epochs"]]
        for p in sorted((out / "runs").glob("*/metrics.json"))
    }


# --- the launcher's configuration ----------------------------------------------------------


def test_launcher_section_and_command_line_give_one_config():
    base = {"store": "s", "out": "o", "grid": {"depth": [1]}}
    assert parse_grid(base).launcher == LauncherConfig()  # local unless asked
    assert parse_grid({**base, "launcher": "submitit"}).launcher == LauncherConfig(name="submitit")
    section = {"name": "submitit", "partition": "gpu", "gpus_per_job": 2, "time": 90, "mem-gb": 32,
               "setup": "module load cuda", "slurm-options": {"mail-type": "END", "--exclusive": True}}  # fmt: skip
    grid = parse_grid({**base, "launcher": section}, launcher_override={"time": 30, "slurm-options": {"mail-type": "ALL"}})
    assert grid.launcher == LauncherConfig(
        name="submitit", partition="gpu", gpus_per_job=2, time_min=30, mem_gb=32.0, setup=("module load cuda",),
        slurm_options={"mail-type": "ALL", "exclusive": True},
    )  # fmt: skip
    assert grid.to_json()["launcher"]["time_min"] == 30  # saved in grid.json with the rest

    def error(match, launcher=None, **override):
        with pytest.raises(GridError, match=match):
            parse_grid({**base, "launcher": launcher or {"name": "submitit"}}, launcher_override=override)

    error(r"launcher: unknown key 'partiton' \(did you mean 'partition'\?\)", {"partiton": "gpu"})
    error(r"launcher\.time: '2h' is not allowed; expected an integer >= 1", {"name": "submitit", "time": "2h"})
    error(r"launcher\.name: 'slurm' is not allowed; expected local \| submitit", {"name": "slurm"})
    error(r"--gpus-per-job: -1 is not allowed", gpus_per_job=-1)
    error(r"launcher\.slurm-options\.mem: --mem is not a free sbatch option here; set it with launcher\.mem-gb / --mem-gb",
          {"name": "submitit", "slurm-options": {"mem": "10G"}})  # fmt: skip
    error(r"--slurm-option output: .*submitit sets it", **{"slurm-options": {"output": "x"}})
    # Slurm options on the command line without the submitit launcher are a mistake, not a no-op
    error(r"--partition: options of the submitit launcher; add --launcher submitit", {"name": "local"}, partition="gpu")
    with pytest.raises(GridError, match=r"0 GPUs per job, but device is 'cuda'"):
        parse_grid({**base, "device": "cuda", "launcher": {"name": "submitit", "gpus-per-job": 0}})


def test_launcher_config_translates_to_submitit_parameters():
    full = LauncherConfig(name="submitit", partition="gpu", gpus_per_job=2, cpus_per_job=8, time_min=90, mem_gb=32.0,
                          account="proj", qos="high", constraint="a100", array_parallelism=16,
                          setup=("module load cuda",), slurm_options={"mail-type": "END"})  # fmt: skip
    assert executor_parameters(full, "spool-abl") == {
        "name": "spool-abl", "timeout_min": 90, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 2,
        "cpus_per_task": 8, "mem_gb": 32.0, "slurm_partition": "gpu", "slurm_account": "proj", "slurm_qos": "high",
        "slurm_constraint": "a100", "slurm_array_parallelism": 16, "slurm_setup": ["module load cuda"],
        "local_setup": ["module load cuda"], "slurm_additional_parameters": {"mail-type": "END"},
    }  # fmt: skip
    # what is not asked for is left to the partition (and 0 GPUs is no --gpus-per-node at all)
    assert executor_parameters(LauncherConfig(name="submitit", gpus_per_job=0), "n") == {
        "name": "n", "timeout_min": 60, "nodes": 1, "tasks_per_node": 1,
    }  # fmt: skip


def test_missing_submitit_says_what_to_install(store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    grid = load_grid(write_grid(tmp_path / "g.yaml", store, tmp_path / "out", launcher=LOCAL))
    with pytest.raises(LauncherError, match=r"pip install 'spool\[slurm\]'"):
        run_ablation(grid, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(GridError, match="--jobs 2 is for the local launcher"):
        run_ablation(grid, jobs=2, progress=False)


def test_dry_run_says_what_would_be_submitted(store, tmp_path):
    grid = write_grid(tmp_path / "g.yaml", store, tmp_path / "out")
    args = ["ablate", str(grid), "--launcher", "submitit", "--partition", "gpu", "--gpus-per-job", "2", "--time", "90",
            "--mem-gb", "32", "--slurm-option", "mail-type=END", "--dry-run"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "launcher submitit on Slurm: 3 jobs, one per run not yet complete, as one job array" in text
    assert "each job: partition gpu, 2 GPUs, 32 GB, 90 min, --mail-type=END" in text
    assert "'slurm_partition': 'gpu'" in text and "local_setup" not in text
    assert not (tmp_path / "out").exists()
    bad = CliRunner().invoke(app, ["ablate", str(grid), "--partition", "gpu", "--dry-run"])
    assert bad.exit_code == 2 and "add --launcher submitit" in bad.output


# --- real jobs: submitit's local executor ----------------------------------------------------


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs inherit it: 3 processes on 2 cores


@pytest.mark.slow
def test_jobs_give_the_local_launchers_results_and_resume(store, tmp_path, one_thread):
    local = run_ablation(load_grid(write_grid(tmp_path / "a.yaml", store, tmp_path / "a")), progress=False)
    grid = load_grid(write_grid(tmp_path / "b.yaml", store, tmp_path / "b", launcher=LOCAL))
    jobs = run_ablation(grid, progress=False)
    assert (local.trained, jobs.trained, jobs.failed) == (3, 3, 0)
    out = tmp_path / "b"
    assert read_csv(out / "results.csv") == read_csv(tmp_path / "a" / "results.csv")
    assert train_losses(out) == train_losses(tmp_path / "a")
    untimed = [[{k: v for k, v in c.items() if k not in TIMING_COLUMNS} for c in s] for s in (local.summary, jobs.summary)]
    assert untimed[0] == untimed[1]
    first = job_ids(out)
    assert len(set(first.values())) == 3 and (out / "slurm" / f"{first[local.rows[0]['cell'] + '-seed0']}_0_log.out").exists()
    assert json.loads((out / "grid.json").read_text())["launcher"]["cluster"] == "local"

    # resume: one run lost its results, another now fails inside its job (a checkpoint trained
    # with other options sits in its folder); only those two are submitted again
    runs = [out / "runs" / f"{r['cell']}-seed0" for r in local.rows]
    for name in ("result.json", "checkpoint_last.pt", "checkpoint_best.pt"):
        (runs[0] / name).unlink()
    (runs[1] / "result.json").unlink()
    shutil.copy(runs[2] / "checkpoint_last.pt", runs[1] / "checkpoint_last.pt")
    again = run_ablation(grid, progress=False)
    assert (again.trained, again.skipped, again.failed) == (1, 1, 1)
    second = job_ids(out)
    assert second[runs[2].name] == first[runs[2].name] and second[runs[0].name] != first[runs[0].name]
    rows = read_csv(out / "results.csv")
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "ResumeMismatchError" in rows[1]["error"] and rows[1]["top1"] == ""
    assert rows[0] == read_csv(tmp_path / "a" / "results.csv")[0]  # resumed from scratch: the same result


@pytest.mark.slow
def test_killed_invocation_reattaches_to_its_running_jobs(store, tmp_path, one_thread):
    """The laptop that waited for the jobs dies; the jobs go on; the same command, run again,
    collects them instead of submitting them again."""
    changes = {"grid": {"lookahead": [0]}, "seeds": [0, 1], "baselines": [], "base": {**BASE, "epochs": 30}}
    grid_file = write_grid(tmp_path / "g.yaml", store, tmp_path / "out", launcher=LOCAL, **changes)
    code = "import sys; from spool.ablate import load_grid, run_ablation; run_ablation(load_grid(sys.argv[1]), progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(grid_file)], stderr=subprocess.DEVNULL)
    out = tmp_path / "out"
    deadline = time.monotonic() + 60
    while len(job_ids(out)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = job_ids(out)
    assert len(first) == 2 and not list((out / "runs").glob("*/result.json")), "the jobs should still be running"

    resumed = run_ablation(load_grid(grid_file), progress=False)
    assert (resumed.trained, resumed.failed) == (2, 0)
    assert job_ids(out) == first and len(list((out / "slurm").glob("*_submitted.pkl"))) == 2  # nothing submitted twice
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["ok", "ok"]


# --- a fake Slurm -----------------------------------------------------------------------------


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch keeps each script as bin/submitted_<n>.sh and answers job 4242 + n; sacct prints
    bin/states ("JobID|State|NodeList" lines); srun only has to exist."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    scripts = {
        "sbatch": "d = pathlib.Path(__file__).parent; n = len(list(d.glob('submitted_*.sh')))\n"
                  "(d / f'submitted_{n}.sh').write_text(pathlib.Path(sys.argv[-1]).read_text())\n"
                  "print(f'Submitted batch job {4242 + n}')",
        "sacct": "print('JobID|State|NodeList'); print((pathlib.Path(__file__).parent / 'states').read_text())",
        "srun": "sys.exit(0)",
    }  # fmt: skip
    for name, body in scripts.items():
        (bin_ / name).write_text(f"#!{sys.executable}\nimport pathlib, sys\n{body}\n")
        (bin_ / name).chmod(0o755)
    (bin_ / "states").write_text("")
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 0)  # no network filesystem to wait for
    monkeypatch.setitem(spool.launcher.POLL_S, "slurm", 0.01)
    submitit.SlurmJob.watcher.clear()  # job ids repeat between tests, unlike on a cluster
    yield bin_
    submitit.SlurmJob.watcher.clear()


def test_slurm_jobs_array_failures_ctrl_c_and_reattach(store, tmp_path, fake_slurm, monkeypatch):
    out = tmp_path / "out"
    slurm = {**LOCAL, "cluster": "slurm", "partition": "gpu", "gpus-per-job": 1, "cpus-per-job": 4, "time": 30,
             "mem-gb": 16, "account": "proj", "slurm-options": {"mail-type": "END"}}  # fmt: skip
    grid_file = write_grid(tmp_path / "g.yaml", store, out, launcher=slurm)
    logs = out / "slurm"
    logs.mkdir(parents=True)
    (logs / "4242_0_0_log.err").write_text("slurmstepd: error: Detected 1 oom-kill event(s) in StepId=4242.batch\n")
    (fake_slurm / "states").write_text("4242_0|OUT_OF_MEMORY|n1\n4242_1|TIMEOUT|n2\n4242_2|RUNNING|n3")

    def ctrl_c(_):  # the user stops waiting after the first look at the jobs
        raise KeyboardInterrupt

    monkeypatch.setattr(spool.launcher, "time", SimpleNamespace(sleep=ctrl_c))
    first = CliRunner().invoke(app, ["ablate", str(grid_file)])
    assert first.exit_code == 130
    said = " ".join(first.output.split())
    assert "1 job keeps running on the cluster (scancel 4242 stops them); re-run the same command to re-attach" in said
    script = (fake_slurm / "submitted_0.sh").read_text().splitlines()
    for line in ("--array=0-2%3", "--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=4", "--time=30",
                 "--mem=16GB", "--account=proj", "--mail-type=END", "--job-name=spool-out"):  # fmt: skip
        assert f"#SBATCH {line}" in script
    assert any(line.endswith(f"-m submitit.core._submit {logs}") for line in script)
    runs = [out / "runs" / f"{r['cell']}-seed0" for r in read_csv(out / "results.csv")]
    assert list(job_ids(out).values()) == ["4242_0", "4242_1", "4242_2"]
    rows = read_csv(out / "results.csv")  # written as the jobs end, before the ablation is over
    assert [r["status"] for r in rows] == ["failed", "failed", "pending"]
    assert "job 4242_0 ended without a result (state OUT_OF_MEMORY): slurmstepd: error: Detected 1 oom-kill" in rows[0]["error"]
    assert "(state TIMEOUT)" in rows[1]["error"]

    # re-run with --retry-failed: the failed runs are submitted again (a new array), the running job is re-attached
    with pytest.raises(KeyboardInterrupt):
        run_ablation(load_grid(grid_file), progress=False, retry_failed=True)
    assert (fake_slurm / "submitted_1.sh").exists() and not (fake_slurm / "submitted_2.sh").exists()
    assert "#SBATCH --array=0-1%2" in (fake_slurm / "submitted_1.sh").read_text()
    assert list(job_ids(out).values()) == ["4243_0", "4243_1", "4242_2"]
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["pending"] * 3

    # and once more; meanwhile job 4242_2 finishes on its node: its result is collected
    grid = load_grid(grid_file)
    (fake_slurm / "states").write_text("4243_0|RUNNING|n1\n4243_1|RUNNING|n2\n4242_2|RUNNING|n3")
    done = []

    def node_finishes(_):
        if not done:  # what the compute node does: the job's function, then submitit's result file
            run = next(r for r in plan_ablation(grid)[1] if r.dir == str(runs[2]))
            threads = torch.get_num_threads()
            submitit.core.utils.cloudpickle_dump(("success", RunJob(1)(grid, run)), logs / "4242_2_0_result.pkl")
            torch.set_num_threads(threads)
            done.append(run)
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(spool.launcher, "time", SimpleNamespace(sleep=node_finishes))
    with pytest.raises(KeyboardInterrupt):
        run_ablation(grid, progress=False)
    assert not (fake_slurm / "submitted_2.sh").exists()  # all three were re-attached
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["pending", "pending", "ok"]
