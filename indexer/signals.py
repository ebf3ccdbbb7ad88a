"""Stopping signals and the child processes a command starts.

A terminal's Ctrl-C reaches every process of the foreground process group, and torchrun stops a rank by
signalling the rank's whole process group: without care, a build's DataLoader workers (or the atlas's
workers) die of a signal meant for the command, and their parent fails on a dead child before it can save
its work. Children started inside `shielded()` begin with SIGINT and SIGTERM blocked, and `detach()`, their
first act, moves them to a process group of their own before unblocking. Stopping signals then reach only
the parent, which ends its children itself (the children also end when they see it gone).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

STOPPING = frozenset({signal.SIGINT, signal.SIGTERM})


def describe(signum: int) -> str:
    """'Ctrl-C (SIGINT)', 'SIGTERM', ..."""
    name = signal.Signals(signum).name
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else name


@contextmanager
def shielded() -> Iterator[None]:
    """Hold SIGINT and SIGTERM in this thread while child processes start here; pending ones arrive after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def detach() -> None:
    """In a child started under `shielded()`: leave the parent's process group, then take signals again."""
    os.setpgid(0, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPPING)


def detach_worker(worker_id: int) -> None:
    """`detach` as a DataLoader `worker_init_fn`."""
    detach()


class Stop(KeyboardInterrupt):
    """A stopping signal (Ctrl-C or SIGTERM), raised where the main thread was when it came."""

    def __init__(self, signum: int) -> None:
        super().__init__(describe(signum))
        self.signum = signum


@contextmanager
def stops_raise() -> Iterator[None]:
    """In the block, SIGINT and SIGTERM raise `Stop`: `finally` clauses and cleanups run for both, as they do
    for Ctrl-C alone by default. Outside the main thread, signals cannot be caught: the block runs as it is."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Stop(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOPPING}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
