"""Quiet output: the terminal shows what calm itself says; library chatter goes to a log file.

While `quiet_output(log_file)` is open on the driver, file descriptors 1 and 2 point to the log, so
everything written by C++ (Ray's core, DeepSpeed's op builds), by subprocesses, by Python's warnings,
by logging handlers and by other libraries' progress bars (all of which write to stderr) lands there.
Only `sys.stdout` is rebound to the terminal: calm's own `print()`s and its progress bar (written to
stdout) stay visible. Ray is told not to forward worker output to the driver, and each worker
redirects its own descriptors to the same log (`redirect_worker_output`, found through an environment
variable that workers of the embedded cluster inherit). `--verbose` skips all of this.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

LOG_ENV = "CALM_WORKER_LOG"

_last_log: Path | None = None  # the log of the latest quiet command, for the error line


def log_path(run_dir: str | os.PathLike, command: str) -> Path:
    """runs/NAME/logs/COMMAND-YYYYmmdd-HHMMSS.log: one file per invocation, never overwritten."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(run_dir) / "logs" / f"{command}-{stamp}.log"


def is_quiet() -> bool:
    return LOG_ENV in os.environ


def last_log() -> Path | None:
    return _last_log


# "package.module.SomeError: what went wrong", as a traceback's last line states an exception
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Exit|Interrupt)\w*): (.+)$")


def one_line(err: BaseException) -> str:
    """The line of an error that says what went wrong. Ray wraps a worker's exception in its traceback
    and may cut the middle of a long one, and libraries add footers after the exception's line (pydantic's
    "For further information visit ..."): the last line that states an exception, shortened to its class
    name, else the last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        stated = _EXCEPTION_LINE.match(line)
        if stated:
            return f"{stated.group(1)}: {stated.group(2)}"
    return lines[-1] if lines else type(err).__name__


@contextlib.contextmanager
def quiet_output(log_file: Path, verbose: bool = False) -> Iterator[Path | None]:
    """Send library output to `log_file` while the block runs (unless verbose); say where it went."""
    global _last_log
    if verbose:
        yield None
        return
    log_file = Path(log_file).resolve()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "a", buffering=1)  # noqa: SIM115 (closed in finally, after the descriptors)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    stdout = sys.stdout
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = terminal
    os.environ[LOG_ENV] = str(log_file)
    _last_log = log_file
    failed = False
    try:
        yield log_file
    except BaseException:
        failed = True
        traceback.print_exc()  # to sys.stderr, the log; the terminal gets one line from the CLI
        raise
    finally:
        _shutdown_ray()  # its shutdown chatter belongs in the log too
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        sys.stdout = stdout
        terminal.close()
        log.close()
        os.environ.pop(LOG_ENV, None)
        if not failed:
            print(f"log: {log_file}")


def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        from launcher.runtime.ray_start import stop_ray

        stop_ray()


def redirect_worker_output() -> None:
    """In a Ray worker of a quiet run: its stdout and stderr (Python's and C++'s) go to the run's log."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:  # a node that does not share the run folder keeps Ray's own worker logs
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
