"""Worker processes for the atlas's tasks, watched so that the parent never waits on one that died.

Each worker is a spawned process with a pipe of its own and takes one task at a time, so the parent always
knows which task a worker holds. It waits on the pipes and on the processes' sentinels together
(`multiprocessing.connection.wait`): a worker that dies (killed, out of memory, a crash in native code) wakes
it at once. Its task is then given to a fresh worker once more; a task lost twice, or workers that die before
they are ready (a script that starts the atlas without an `if __name__ == "__main__":` guard re-runs itself
in every worker), stop the run with a one-line error. Whatever ends the run (the last task, an error, Ctrl-C)
the workers are stopped before `run` returns or raises; a worker whose parent died sees its pipe close and
exits.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import traceback
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Generic, TypeVar

from actindex.indexer.signals import describe, detach, shielded
from actindex.kernels.errors import UserError, one_line

T = TypeVar("T")
R = TypeVar("R")
Start = Callable[..., Callable[[Any], Any]]  # start(*args) -> run(task) -> outcome, called in each worker

RETRIES = 1  # a task whose worker died is given to a fresh worker this many times more
_STOP_SECONDS = 5.0  # for a worker to end on SIGTERM before SIGKILL


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (the `__cause__` of the error the parent raises)."""

    def __str__(self) -> str:
        return str(self.args[0])


class WorkerError(RuntimeError):
    """A task failed in a worker with an error that is not a `UserError`."""


@dataclass(frozen=True)
class KillTask:
    """Testing: the worker running task number `task` dies by SIGKILL on its first `attempts` tries."""

    task: int
    attempts: int = 1


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    ready: bool = False
    task: tuple[int, int] | None = None  # (task number, attempt) it holds


class TaskPool(Generic[T, R]):
    """`jobs` spawned workers, each made by `start(*args)`; `run(tasks)` yields (task number, outcome)."""

    def __init__(self, jobs: int, start: Start, args: tuple[Any, ...], kill: KillTask | None = None,
                 note: Callable[[str], None] | None = None) -> None:
        self.jobs, self.start, self.args, self.kill = jobs, start, args, kill
        self.note = note  # told when a worker dies and its task is given again
        self.context = multiprocessing.get_context("spawn")  # no fork: torch's threads and CUDA do not survive it
        self.workers: list[_Worker] = []
        self.started = False  # some worker has become ready
        self.start_failures = 0

    def run(self, tasks: Sequence[T]) -> Generator[tuple[int, R], None, None]:
        pending: deque[tuple[int, int]] = deque((number, 0) for number in range(len(tasks)))
        left = len(tasks)
        try:
            for _ in range(min(self.jobs, left)):
                self._spawn()
            while left:
                for worker in self.workers:
                    if worker.ready and worker.task is None and pending:
                        worker.task = pending.popleft()
                        number, attempt = worker.task
                        with contextlib.suppress(OSError):  # it just died: its sentinel says so, the task goes on
                            worker.conn.send((tasks[number], number, attempt))
                ready = set(wait([w.conn for w in self.workers] + [w.process.sentinel for w in self.workers]))
                for worker in list(self.workers):
                    if worker.conn not in ready and worker.process.sentinel not in ready:
                        continue
                    try:
                        while worker.conn.poll():  # what it sent before it died counts too
                            done = self._receive(worker, worker.conn.recv())
                            if done is not None:
                                left -= 1
                                yield done
                    except (EOFError, OSError):  # its end closed: it has died, or is dying
                        self._lost(worker, pending)
                        continue
                    if worker.process.sentinel in ready:
                        self._lost(worker, pending)
        finally:
            self._stop()

    def _spawn(self) -> None:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_serve, args=(child, self.start, self.args, self.kill), daemon=True)
        with shielded():  # the terminal's Ctrl-C is for the parent, which stops its workers itself
            process.start()
        child.close()
        self.workers.append(_Worker(process, parent))

    def _receive(self, worker: _Worker, message: tuple[str, Any]) -> tuple[int, R] | None:
        kind, payload = message
        if kind == "ready":
            worker.ready = self.started = True
            return None
        assert worker.task is not None
        number, _ = worker.task
        worker.task = None
        if kind == "done":
            return number, payload
        user, text, remote = payload
        error = UserError(text) if user else WorkerError(text)
        raise error from RemoteTraceback(remote)

    def _lost(self, worker: _Worker, pending: deque[tuple[int, int]]) -> None:
        """A worker died: give its task to a fresh worker, or stop the run."""
        self.workers.remove(worker)
        worker.conn.close()
        worker.process.join(_STOP_SECONDS)
        if worker.process.is_alive():  # closed its pipe yet lingers: it is of no more use
            worker.process.kill()
            worker.process.join()
        code = worker.process.exitcode
        how = _exit(code)
        if not worker.ready:
            self.start_failures += 1
            if code is not None and code > 0 and not self.started:  # an error, before any worker could start
                raise UserError(f"an atlas worker process failed while starting ({how}; its error is printed "
                                "above). A script that calls build_atlas with jobs > 1 must do so under "
                                "'if __name__ == \"__main__\":', as every worker imports the script again")
            if self.start_failures > self.jobs:
                raise UserError(f"atlas worker processes keep dying while starting ({how}); the pictures made "
                                "so far are kept: run the same command again, with fewer --jobs if memory is short")
        if worker.task is not None:
            number, attempt = worker.task
            if attempt >= RETRIES:
                raise UserError(f"an atlas worker process died ({how}) on task {number} a second time; the "
                                "pictures made so far are kept: run the same command again to continue (with "
                                "fewer --jobs or a smaller --batch-size if the machine ran out of memory)")
            pending.appendleft((number, attempt + 1))
            if self.note is not None:
                self.note(f"an atlas worker process died ({how}); its task goes to a new worker")
        if pending or any(w.task is not None for w in self.workers):
            self._spawn()

    def _stop(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive() and worker.task is None:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)  # idle: end now
            else:
                worker.process.terminate()  # busy (the run ends early): its task's files stay whole
        for worker in self.workers:
            worker.process.join(_STOP_SECONDS)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self.workers = []


def _exit(code: int | None) -> str:
    return f"killed by {describe(-code)}" if code is not None and code < 0 else f"exit code {code}"


def _serve(conn: Connection, start: Start, args: tuple[Any, ...], kill: KillTask | None) -> None:
    """A worker's life: make the task runner, then run the tasks the parent sends until it sends None or goes."""
    detach()
    run = start(*args)
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        task, number, attempt = message
        if kill is not None and kill.task == number and attempt < kill.attempts:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            reply: tuple[str, Any] = ("done", run(task))
        except Exception as error:  # noqa: BLE001 - sent to the parent, which raises it
            reply = ("error", (isinstance(error, UserError), one_line(error), traceback.format_exc()))
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return
