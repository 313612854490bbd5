"""Hold a Ctrl-C or TERM back until the tracking-store call in progress has returned.

orchestration/signals.py turns SIGINT and SIGTERM into KeyboardInterrupt in the main thread, wherever
it happens to be. Inside a call to an SQLite store that place can be the middle of SQLAlchemy's fetch or
commit: the interrupted connection is invalidated half-way ("Error closing cursor ... Cannot operate on a
closed database", logged with a traceback), and the runs' closing writes that follow go through a
connection pool left in that state. The calls are short (milliseconds), so the signal handler asks
`defer` first: inside a `store_call` block of the main thread the interruption is kept and raised as the
block ends, after the call has returned and its connection has gone back to the pool.

A second signal while one is held is not held: someone pressing Ctrl-C twice wants out now.

This module imports nothing heavy: the signal handler consults it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

_depth = 0
_held: Callable[[], None] | None = None  # the interruption being held, if one is


def defer(raise_interruption: Callable[[], None]) -> bool:
    """Called by a signal handler (main thread): True when `raise_interruption` is kept for the end of the
    current `store_call` block, False when the handler should raise now (no block open, or one already
    held)."""
    global _held
    if _depth == 0 or _held is not None:
        return False
    _held = raise_interruption
    return True


@contextlib.contextmanager
def store_call() -> Iterator[None]:
    """A block a signal does not cut: an interruption arriving inside it is raised when it ends.

    Only the main thread's blocks count (signal handlers run there); in another thread this does nothing.
    """
    global _depth, _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _held is not None:
            raise_interruption, _held = _held, None
            raise_interruption()


def holding() -> bool:
    """Whether an interruption is being held (for tests)."""
    return _held is not None
