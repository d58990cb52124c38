"""Interrupts of a long run: SIGTERM and Ctrl-C end it at once, even inside an engine call, and its partial outputs
are removed; the process then exits with the status a shell gives the signal (143, 130), which scripts tell apart
from an error's 1."""

from __future__ import annotations

import signal


def terminated(signum, frame):
    """The handler of SIGTERM and SIGINT: unwind like an exception (outputs' `finally` and `__exit__` run)."""
    raise SystemExit(128 + signum)


def unwind_on_signals() -> None:
    """SIGTERM (a scheduler's kill, a timeout) and Ctrl-C unwind alike, so temporary outputs are removed."""
    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGINT, terminated)


def in_background(fn, *args, **kwargs):
    """fn(*args, **kwargs), computed in a daemon thread while this one waits. Signal handlers run in the main thread
    only, and only between bytecodes: an engine call running here would hold off SIGTERM and Ctrl-C until it returned
    (minutes on a long batch). Waiting here instead, they end the run at once and remove its partial outputs."""
    import queue
    import threading

    done: queue.SimpleQueue = queue.SimpleQueue()

    def work():
        try:
            done.put((True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 -- handed to the waiting thread, which raises it
            done.put((False, e))

    threading.Thread(target=work, name="utrexport-engine", daemon=True).start()
    try:
        finished, value = done.get()
    except BaseException as interrupt:  # SIGTERM's SystemExit or Ctrl-C, while the engine still runs
        end_after_unwinding(interrupt)
        raise
    if not finished:
        raise value
    return value


def end_after_unwinding(interrupt: BaseException) -> None:
    """An engine's call cannot be stopped, and tearing the interpreter down around it can abort the process (SIGABRT,
    seen once in a CI run). So once the run has unwound (its partial output removed), the process ends at once, with
    the status it was ending with, skipping the teardown."""
    import atexit
    import os
    import sys

    code = interrupt.code if isinstance(interrupt, SystemExit) and isinstance(interrupt.code, int) else 1

    def end():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    atexit.register(end)
