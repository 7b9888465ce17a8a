"""What every ``fourbit`` command shares: exit codes, the error type that carries one, the
rich console, atomic output directories, peak-RSS measurement and byte formatting."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import click
from rich.console import Console

# Exit codes (documented in ``fourbit --help``): 0 success, 2 usage (click's own), then ours.
EXIT_OK = 0
EXIT_USAGE = 2          # bad flag or argument value (click), unknown config key, malformed YAML
EXIT_INPUT = 3          # a file or directory that is missing or not what it should be
EXIT_DOES_NOT_FIT = 4   # estimate: the model does not fit the memory given
EXIT_CHECK_FAILED = 5   # doctor: a check failed; train: a quality check failed
EXIT_OUTPUT_EXISTS = 6  # the destination exists (pass --overwrite)

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class CliError(click.ClickException):
    """A user-facing error with a meaningful exit code; click prints ``Error: <message>``."""

    def __init__(self, message: str, exit_code: int = EXIT_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


def require_dir(path: Path, what: str, must_have: Optional[str] = None) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CliError(f"{what} {str(path)!r} is not a directory", EXIT_INPUT)
    if must_have and not (path / must_have).is_file():
        raise CliError(f"{what} {str(path)!r} has no {must_have}", EXIT_INPUT)
    return path


@contextlib.contextmanager
def atomic_dir(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a temporary directory beside ``dst``; on success it is renamed to ``dst``, on any
    error it is removed, so a half-written output never sits at ``dst`` looking complete."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CliError(f"destination {str(dst)!r} exists; pass --overwrite to replace it", EXIT_OUTPUT_EXISTS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """Peak resident memory of this process over a block, above what it held at the start.
    Linux: resets the kernel's high-water mark (``/proc/self/clear_refs``, value 5) and reads
    ``VmHWM``; elsewhere ``available`` is False and ``peak_bytes`` is None."""

    def __enter__(self) -> "PeakRSS":
        self.start_kib = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.available = self.start_kib is not None
        except OSError:
            self.available = False
        self.peak_bytes = None
        return self

    def __exit__(self, *exc) -> bool:
        hwm = _status_kib("VmHWM")
        if self.available and hwm is not None:
            self.peak_bytes = max(0, hwm - self.start_kib) * 1024
            self.peak_total_bytes = hwm * 1024
        return False


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
