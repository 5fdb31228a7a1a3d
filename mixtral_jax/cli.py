"""What every command shares: a user's mistake is one line on stderr, never a traceback.

def main(argv=None) -> int:
    args = parser.parse_args(argv)
    return cli.run(lambda: work(args))  # 0, or 2 with "error: ..." on stderr
"""

from __future__ import annotations

import sys
from collections.abc import Callable

# The exit status of a command refused by bad input (as argparse's own errors).
FAILED = 2
INTERRUPTED = 130


def run(
    work: Callable[[], int | None],
    errors: tuple[type[BaseException], ...] = (ValueError, OSError),
    *,
    interrupted: str | None = None,
    fresh_line: bool = False,
) -> int:
    """`work()`'s exit status (None: 0). An exception of `errors` (the library's errors
    are ValueErrors that say what is wrong and what to do) is printed as `error: ...` on
    stderr, status 2; Ctrl-C prints `interrupted` when given, status 130. `fresh_line`:
    start the message on a new line (after a progress line or streamed text)."""
    start = "\n" if fresh_line else ""
    try:
        status = work()
    except errors as e:
        print(f"{start}error: {e}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"{start}interrupted: {interrupted}", file=sys.stderr)
        return INTERRUPTED
    return 0 if status is None else status
