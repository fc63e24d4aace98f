"""``spool ablate grid.yaml --launcher submitit``: each run of a grid as its own cluster job.

Every run (cell x seed, and each baseline) is one job of one job array (``executor.batch()``:
one ``sbatch``, at most ``array-parallelism`` tasks at once). A job loads the features its
run needs from the store itself (the store, the ``out`` folder and the Python environment
must be on a filesystem the compute nodes share, at the same paths) and trains with the
local launcher's code path (``spool.runs.train_run``), which writes the run's ``result.json``
or ``error.json``: the results are the same whichever launcher ran the grid.

This process waits, reports each run as its job ends and keeps ``results.csv`` up to date.
A job that dies without a result (Slurm's time limit, out of memory, node failure) is
recorded as a failed run with Slurm's state and the last line of its log. Each run folder
keeps its ``job.json`` (cluster job id): a later invocation re-attaches to jobs that are
still queued or running instead of submitting them again. submitit's scripts and logs
go to ``out/slurm``.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from spool.files import write_json
from spool.grid import GridConfig, LauncherConfig
from spool.runs import ERROR, load_group_features, record_failure, train_run

LOG_FOLDER = "slurm"  # submitit's folder (sbatch scripts, pickles, logs), inside the ablation's out
JOB = "job.json"  # in a run's folder: the job that was submitted for it
POLL_S = {"slurm": 15.0, "local": 0.5}  # seconds between two looks at the jobs
# sacct states of a job that may still write its run's result
ACTIVE_STATES = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SUSPENDED", "PREEMPTED", "SIGNALING", "STAGE_OUT", "STOPPED",
}  # fmt: skip


class LauncherError(RuntimeError):
    """The jobs cannot be submitted (submitit missing, sbatch refused them)."""


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise LauncherError(
            "the submitit launcher needs the submitit package: pip install 'spool[slurm]'"
        ) from None
    return submitit


# --- what is submitted ----------------------------------------------------------------------


def executor_parameters(launcher: LauncherConfig, name: str) -> dict[str, Any]:
    """The keyword arguments of submitit's ``AutoExecutor.update_parameters`` for one job per
    run: shared names (timeout_min, gpus_per_node, ...) and ``slurm_*`` ones, which the
    local executor ignores. A resource left None is not asked for (the partition's default)."""
    p: dict[str, Any] = {"name": name, "timeout_min": launcher.time_min, "nodes": 1, "tasks_per_node": 1}
    if launcher.gpus_per_job:  # --gpus-per-node=0 is refused by some Slurm versions: leave it out
        p["gpus_per_node"] = launcher.gpus_per_job
    if launcher.cpus_per_job is not None:
        p["cpus_per_task"] = launcher.cpus_per_job
    if launcher.mem_gb is not None:
        p["mem_gb"] = launcher.mem_gb
    for key in ("partition", "account", "qos", "constraint", "array_parallelism"):
        if getattr(launcher, key) is not None:
            p[f"slurm_{key}"] = getattr(launcher, key)
    if launcher.setup:
        p["slurm_setup"] = list(launcher.setup)
        p["local_setup"] = list(launcher.setup)
    if launcher.slurm_options:
        p["slurm_additional_parameters"] = dict(launcher.slurm_options)
    return p


def job_name(grid: GridConfig) -> str:
    return f"spool-{Path(grid.out).resolve().name}"


def describe(launcher: LauncherConfig) -> str:
    """The resources of one job, for people: 'partition gpu, 1 GPU, 8 CPUs, 32 GB, 120 min'."""
    parts = [f"partition {launcher.partition}"] if launcher.partition else ["default partition"]
    parts.append(f"{launcher.gpus_per_job} GPU{'s' if launcher.gpus_per_job != 1 else ''}")
    if launcher.cpus_per_job is not None:
        parts.append(f"{launcher.cpus_per_job} CPU{'s' if launcher.cpus_per_job != 1 else ''}")
    if launcher.mem_gb is not None:
        parts.append(f"{launcher.mem_gb:g} GB")
    parts.append(f"{launcher.time_min} min")
    parts += [f"{k} {getattr(launcher, k)}" for k in ("account", "qos", "constraint") if getattr(launcher, k)]
    parts += [f"--{k}" + ("" if v is True else f"={v}") for k, v in launcher.slurm_options.items()]
    return ", ".join(parts)


def plan_lines(grid: GridConfig, runs: list) -> list[str]:
    """What ``--dry-run`` says would be submitted for ``runs`` (the runs not yet complete)."""
    launcher = grid.launcher
    at_once = f", at most {launcher.array_parallelism} at once" if launcher.array_parallelism else ""
    where = "Slurm" if launcher.cluster == "slurm" else "local processes (submitit's local executor)"
    lines = [f"launcher submitit on {where}: {len(runs)} jobs, one per run not yet complete, as one job array{at_once}"]
    earlier = sum(read_job(r.dir) is not None for r in runs)
    if earlier:
        lines.append(f"  {earlier} of these runs have a job from an earlier invocation: re-attached if it is "
                     "still queued or running, else submitted again")  # fmt: skip
    lines.append(f"  each job: {describe(launcher)}")
    if launcher.setup:
        lines.append(f"  setup before each job: {'; '.join(launcher.setup)}")
    other = "local_" if launcher.cluster == "slurm" else "slurm_"
    params = {k: v for k, v in executor_parameters(launcher, job_name(grid)).items() if not k.startswith(other)}
    lines.append(f"  submitit parameters: {params}")
    lines.append(f"  scripts and logs: {Path(grid.out) / LOG_FOLDER}")
    return lines


def make_executor(grid: GridConfig):
    """submitit's AutoExecutor for the grid's launcher, writing to ``out/slurm``."""
    submitit = require_submitit()
    launcher = grid.launcher
    executor = submitit.AutoExecutor(folder=Path(grid.out) / LOG_FOLDER, cluster=launcher.cluster)
    executor.update_parameters(**executor_parameters(launcher, job_name(grid)))
    return executor


# --- what a job runs ----------------------------------------------------------------------


class RunJob:
    """One run, inside its job: load the features it needs and train it as the local launcher
    does (``spool.runs.train_run`` writes result.json or error.json and returns the record).

    submitit calls ``checkpoint`` when Slurm preempts the job or its time limit is near; the
    job is requeued (up to 3 times for time limits) and the run continues from its
    checkpoint_last.pt, as a re-run of the local launcher would."""

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def __call__(self, grid: GridConfig, run) -> dict:
        import torch

        # torch would use every core of the node, not the job's share of it
        affinity = getattr(os, "sched_getaffinity", None)
        torch.set_num_threads(self.threads or (len(affinity(0)) if affinity else os.cpu_count() or 1))
        print(f"spool: run {run.dir} ({run.cell.origin}, seed {run.seed})", flush=True)
        features = load_group_features(grid, run.cfg.store, run.cfg.token_pool, {run.cfg.head})
        try:
            record = train_run(run, features)
        finally:
            features.store.close()
        print(f"spool: {record['status']} {record.get('top1', record['error'])}", flush=True)
        return record

    def checkpoint(self, grid: GridConfig, run):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, grid, run)


# --- submitting, re-attaching, collecting ----------------------------------------------------


def read_job(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / JOB
    return json.loads(path.read_text()) if path.exists() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an orphaned zombie that nobody reaps is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def reattach(records: dict[Any, dict]) -> dict[Any, Any]:
    """For each key, the job an earlier invocation submitted (``records``: key -> the run's
    job.json) if it is still queued or running. Jobs that ended, or that their cluster no
    longer knows, are left out: their runs are submitted again."""
    submitit = require_submitit()
    slurm = {k: submitit.SlurmJob(folder=r["folder"], job_id=r["job_id"])
             for k, r in records.items() if r.get("cluster") == "slurm"}  # fmt: skip
    if slurm:
        submitit.SlurmJob.watcher.update()  # one sacct call for all of them
    alive = {k: j for k, j in slurm.items() if _state(j, mode="cache").split(" ")[0].upper() in ACTIVE_STATES}
    for k, r in records.items():
        if r.get("cluster") == "local":  # its controller process outlived the invocation that started it
            job = submitit.LocalJob(folder=r["folder"], job_id=r["job_id"])
            if _pid_alive(int(job.job_id)) and not job.paths.result_pickle.exists():
                alive[k] = job
    return alive


def _done(job, orphans: set[str]) -> bool:
    if job.job_id in orphans:  # a re-attached local job: not our child, so submitit cannot poll it
        return job.paths.result_pickle.exists() or not _pid_alive(int(job.job_id))
    return job.done()


def _state(job, mode: str | None = None) -> str:
    try:
        return str(job.watcher.get_state(job.job_id, mode=mode) if mode else job.state)
    except Exception:  # submitit's state is informative only; never let it hide the failure
        return "UNKNOWN"


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    # submitit's own log lines say that the job failed, not why
    useful = [ln for ln in lines if not ln.startswith("submitit ") and not ln.startswith("-----")]
    return (useful or lines or [""])[-1][:300]


def failure_reason(job, err: BaseException) -> str:
    """One line for results.csv: the job, how it ended, and the line of its log that says why."""
    submitit = require_submitit()
    log = job.paths.stderr
    if isinstance(err, submitit.core.utils.FailedJobError):  # the job raised: the traceback's last line
        text = str(err).split("----------------------")
        why = _last_line(text[1] if len(text) > 2 else str(err))
        return f"job {job.job_id} raised {why} (log {log})"
    try:
        tail = job.stderr()
    except OSError:
        tail = None
    why = _last_line(tail) or "no error in its log"
    return f"job {job.job_id} ended without a result (state {_state(job)}): {why} (log {log})"


def run_jobs(
    grid: GridConfig,
    runs: list,
    report: Callable[[Any, dict], None],
    *,
    on_update: Callable[[], None] = lambda: None,
    console=None,
    progress: bool = True,
) -> None:
    """Submit the runs that have no live job, re-attach to those that have one, and wait:
    each job that ends is reported (``report(run, record)``), ``on_update()`` follows.
    Ctrl-C stops waiting (Slurm jobs keep running; a re-run re-attaches to them) and re-raises."""
    submitit = require_submitit()
    launcher = grid.launcher
    folder = Path(grid.out) / LOG_FOLDER
    records = {i: r for i, r in enumerate(read_job(run.dir) for run in runs) if r}
    alive = reattach(records)
    waiting: dict[Any, Any] = {job: runs[i] for i, job in alive.items()}  # job -> run
    orphans = {job.job_id for job in alive.values() if isinstance(job, submitit.LocalJob)}
    fresh = [run for i, run in enumerate(runs) if i not in alive]

    if fresh:
        executor = make_executor(grid)
        jobs = []
        try:
            with executor.batch():  # one job array: one sbatch call, one queue entry per task
                for run in fresh:
                    jobs.append(executor.submit(RunJob(launcher.cpus_per_job), grid, run))
        except Exception as err:  # sbatch's refusal (bad partition, account, limits) reaches people as is
            raise LauncherError(f"submitting {len(fresh)} jobs failed: {err}") from err
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for run, job in zip(fresh, jobs):
            Path(run.dir).mkdir(parents=True, exist_ok=True)
            (Path(run.dir) / ERROR).unlink(missing_ok=True)  # retried: pending until its job ends
            write_json(Path(run.dir) / JOB, {"job_id": job.job_id, "cluster": launcher.cluster,
                                                "folder": str(executor.folder), "submitted": now})  # fmt: skip
            waiting[job] = run
    if progress and console is not None and fresh:
        where = "Slurm" if launcher.cluster == "slurm" else "local submitit"
        ids = sorted({j.job_id.split("_")[0] for j in jobs})
        console.print(f"submitted {len(fresh)} runs as {where} job{'s' if len(ids) > 1 else ''} "
                      f"{', '.join(ids)} ({describe(launcher)} each); logs in {folder}")  # fmt: skip
    if progress and console is not None and alive:
        console.print(f"re-attached {len(alive)} runs to their jobs from an earlier invocation (still queued or running)")
    on_update()

    try:
        while waiting:
            ended = [j for j in waiting if _done(j, orphans)]
            for job in ended:
                run = waiting.pop(job)
                report(run, _collect(job, run))
            if ended:
                on_update()
            if waiting:
                time.sleep(POLL_S[launcher.cluster])
    except KeyboardInterrupt:
        if launcher.cluster == "local":  # the jobs are this machine's processes: stop them with us
            for job in waiting:
                if job.job_id not in orphans:
                    job.cancel(check=False)
            message = "the local jobs were stopped; re-run the same command to resume"
        else:
            arrays = sorted({j.job_id.split("_")[0] for j in waiting})
            jobs_keep = "1 job keeps" if len(waiting) == 1 else f"{len(waiting)} jobs keep"
            message = (f"{jobs_keep} running on the cluster (scancel {' '.join(arrays)} stops them); "
                       "re-run the same command to re-attach to them and collect their results")  # fmt: skip
        if console is not None:
            console.print(f"[bold yellow]interrupted:[/] {message}")
        raise


def _collect(job, run) -> dict:
    """The record of an ended job: what ``train_run`` returned, or, for a job that raised or died
    without a result, a failed record written to the run's error.json."""
    try:
        return job.result()
    except Exception as err:  # the job's boundary: a dead job is one failed run, the others go on
        return record_failure(run, failure_reason(job, err), wall_s=None)
