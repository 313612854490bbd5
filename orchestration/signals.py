"""SIGINT and SIGTERM end a command the same way: its open runs FAILED with the signal's name, one line.

Both signals become KeyboardInterrupt("interrupted by SIGINT" / "... SIGTERM") in the main thread. Every
recorder already closes its open runs on any BaseException (`tracking.recorder.reason_of` turns this one
into the failure_reason "interrupted by SIGTERM"), and the local worker pool is stopped by the same
unwinding, so a TERM from a scheduler or `kill` leaves the store as tidy as a Ctrl-C. Worker processes
ignore SIGINT (pipeline/experiments/pool.py) and die with their parent, so no traceback but ours. A
signal that arrives during a call to an SQLite store is raised when that call returns
(tracking/interrupts.py): cutting SQLAlchemy mid-fetch logged a traceback and left its pool half-closed.

`run_cli(command, prog_name)` runs a click command with the handlers installed and, when a signal ended
it, prints one line and exits 128 + the signal's number (130 for Ctrl-C, 143 for TERM), as shells do.
"""

from __future__ import annotations

import signal

from tracking import interrupts

# The signal that ended the command, if one did (set by the handler, read when the command has unwound).
_received: list[int] = []


def _interrupt(signum: int, frame) -> None:
    if _received:
        return  # a second Ctrl-C while the runs are being closed: let that finish
    # Inside a call to an SQLite store the interruption waits until the call has returned.
    if interrupts.defer(lambda: _raise_interruption(signum)):
        return
    _raise_interruption(signum)


def _raise_interruption(signum: int) -> None:
    if _received:
        return  # a second signal already raised it while this one was held
    _received.append(signum)
    raise KeyboardInterrupt(f"interrupted by {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt("interrupted by <name>") in the main thread."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def received_signal() -> int | None:
    return _received[0] if _received else None


def interruption_line(signum: int) -> str:
    name = signal.Signals(signum).name
    return (
        f"Interrupted by {name}: open runs marked FAILED (interrupted by {name}); re-run the same command "
        "to resume, FINISHED work is reused."
    )


def run_cli(command, prog_name: str) -> int:
    """Run a click command as `command(prog_name=...)` would, with the handlers installed; returns the exit
    code. An interruption prints `interruption_line` instead of click's "Aborted!"."""
    import click

    install_signal_handlers()
    try:
        result = command.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        signum = received_signal()
        if signum is None:
            click.echo("Aborted!", err=True)
            return 1
        click.echo(interruption_line(signum), err=True)
        return 128 + signum
    except KeyboardInterrupt:
        # Raised while click was not running the command (parsing, say, or after it returned).
        signum = received_signal() or signal.SIGINT
        click.echo(interruption_line(signum), err=True)
        return 128 + signum
    except click.ClickException as error:
        error.show()
        return error.exit_code
    return result if isinstance(result, int) else 0
