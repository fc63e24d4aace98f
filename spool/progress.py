"""Progress for long work: a rich bar on a terminal, plain log lines elsewhere (CI, Slurm logs)."""

from __future__ import annotations

import sys
import threading
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


# Off a terminal (Slurm and nohup logs, pipes) rich assumes 80 columns: tables lose the end of
# their cells and long lines wrap. A log file has no width, so it gets a wide one.
LOG_WIDTH = 400


def make_console(*, stderr: bool = False) -> Console:
    """A rich Console for stdout (or stderr): the terminal's width on a terminal, LOG_WIDTH elsewhere."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else LOG_WIDTH)


class RateProgress:
    """Counts items (videos) and frames; shows items/s, frames/s, failures and ETA.

    Thread-safe: the store writer thread advances it while the main thread decodes and runs the model.
    """

    def __init__(self, total: int, *, enabled: bool = True, description: str = "", log_every_s: float = 10.0):
        self.total = total
        self.enabled = enabled
        self.description = description
        self.log_every_s = log_every_s
        self.done = 0
        self.failed = 0
        self.frames = 0
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self._last_log = self._start
        self._console = make_console(stderr=True)
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "RateProgress":
        self._start = self._last_log = time.perf_counter()
        if self.enabled and self._console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rates]}"),
                TextColumn("[red]{task.fields[failed]} failed"),
                TimeRemainingColumn(),
                console=self._console,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, rates="", failed=0)
        return self

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        return (self.done + self.failed) / elapsed, self.frames / elapsed

    def advance(self, *, frames: int = 0, failed: bool = False) -> None:
        with self._lock:
            self.failed += int(failed)
            self.done += int(not failed)
            self.frames += frames
            if not self.enabled:
                return
            items_s, frames_s = self.rates()
            if self._progress is not None:
                self._progress.update(
                    self._task, advance=1, rates=f"{items_s:.1f} videos/s {frames_s:.0f} frames/s", failed=self.failed
                )
                return
            now = time.perf_counter()
            if now - self._last_log >= self.log_every_s or self.done + self.failed == self.total:
                self._last_log = now
                print(
                    f"{self.description}: {self.done + self.failed}/{self.total} videos, {self.failed} failed, "
                    f"{items_s:.1f} videos/s, {frames_s:.0f} frames/s",
                    file=sys.stderr,
                    flush=True,
                )

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
