"""What a damaged Orbax checkpoint looks like to a user: one line naming the file.

A full disk or a preempted VM leaves files truncated, empty or missing. Orbax then
fails with a TensorStore error buried under a long traceback, and the reads still
pending when the first failed print theirs later. `quietly` silences those echoes
around a restore; `describe` says what is wrong in one line.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import sys
import traceback
from pathlib import Path


def describe(directory: Path, error: Exception) -> str:
    """One line naming the file at fault in the Orbax checkpoint `directory` that
    failed to restore with `error`: an empty file or a metadata file that does not
    parse, if there is one, else the first line of the innermost error (TensorStore's
    names the array and the database it failed on)."""
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        if path.stat().st_size == 0:
            return f"{path} is empty"
        if path.parent.name != "d" and path.suffix not in (".ocdbt", ".txt"):
            try:  # the metadata files are JSON; array data lives under d/ and *.ocdbt
                json.loads(path.read_bytes())
            except ValueError as e:
                return f"{path} does not parse: {e}"
    while (cause := error.__cause__ or error.__context__) is not None:
        error = cause
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    first_line = first_line.split(" [tensorstore_spec=")[0]  # the reader's settings
    return first_line if len(first_line) <= 400 else first_line[:400] + " ..."


@contextlib.contextmanager
def quietly():
    """Without the reader's echoes of a failure that `describe` reports: Orbax's
    warnings, asyncio's "exception was never retrieved", and the errors of the reads
    still pending when the first failed (printed when they are collected or, later,
    when their callbacks find Orbax's event loop closed: `_drop_failed_reads`)."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    hook = sys.unraisablehook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    except Exception:
        gc.collect()  # the failed reads' coroutines, collected while still muted
        if not isinstance(hook, functools.partial) or hook.func is not _drop_failed_reads:
            hook = functools.partial(_drop_failed_reads, hook)
        asyncio_logger = logging.getLogger("asyncio")
        if not any(isinstance(f, _FailedReadsFilter) for f in asyncio_logger.filters):
            asyncio_logger.addFilter(_FailedReadsFilter())
        raise
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        sys.unraisablehook = hook


def _drop_failed_reads(hook, unraisable) -> None:
    """`hook`, but silent on the echoes of a failed restore's other reads, which end
    after Orbax gave up on them: their callbacks find its event loop closed, and
    their coroutines are collected with an error nothing waits for."""
    error, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    orbax_read = code is not None and "orbax" in Path(code.co_filename).parts
    if not (closed_loop or orbax_read):
        hook(unraisable)


class _FailedReadsFilter(logging.Filter):
    """asyncio's "exception was never retrieved" for a failed restore's other reads,
    logged whenever their tasks are collected, dropped; every other record kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        frames = traceback.extract_tb(error.__traceback__) if error is not None else []
        from_orbax = any("orbax" in Path(frame.filename).parts for frame in frames)
        return not ("never retrieved" in record.getMessage() and from_orbax)
