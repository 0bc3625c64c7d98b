"""Group commit: the same small write from many greenlets, in one transaction.

A login storm asks the database the same few questions thousands of times
a second (who is this token, record this login, record this report). Each
in its own transaction, the begin/commit and the statement's set-up cost
more than the work. Here each greenlet hands its item over and waits; one
greenlet runs every item waiting at that moment as one unit of work, and
hands each its own answer. The caller sees what it saw before: its answer,
or the exception (an outage reaches every waiter, and each says so to its
device). Nothing is acknowledged before its transaction committed.

One item that the database refuses (a value a column cannot hold) must not
fail the others in its batch: after a refusal other than an outage, the
items are run again one by one, and only the guilty one gets the error.

A process that stops runs what is queued first (`drain`): a report queued
behind its answer is recorded, not lost with the process.
"""

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import gevent
from gevent.event import AsyncResult
from sqlalchemy import Connection

from .db import Database, is_unavailable

__all__ = ["GroupCommit", "drain"]

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Answer = TypeVar("Answer")

# Large enough to amortise a transaction, small enough that one batch's
# statements do not hold the database (and, on SQLite, the event loop) long.
MAX_BATCH = 500

_EVERY: "weakref.WeakSet[GroupCommit]" = weakref.WeakSet()  # this process's, for `drain`


class GroupCommit(Generic[Item, Answer]):
    def __init__(
        self,
        db: Database,
        work: Callable[[Connection, Sequence[Item]], Sequence[Answer]],
        *,
        name: str,
        max_batch: int = MAX_BATCH,
    ) -> None:
        """`work(connection, items)` answers each item, in order, inside one transaction."""
        self.db = db
        self.work = work
        self.name = name
        self.max_batch = max_batch
        self._waiting: list[tuple[Item, AsyncResult]] = []
        self._runner: gevent.Greenlet | None = None
        self.batches = 0  # how many transactions ran, for tests and benches
        _EVERY.add(self)

    def submit(self, item: Item) -> Answer:
        """Run `item` with whatever else is waiting; its answer, or the batch's error."""
        return self.submit_later(item).get()

    def submit_later(self, item: Item) -> AsyncResult:
        """Queue `item` without waiting: its answer (or error) arrives in the result."""
        answer = AsyncResult()
        self._waiting.append((item, answer))
        if self._runner is None:
            self._runner = gevent.spawn(self._run)
        return answer

    def _run(self) -> None:
        try:
            while self._waiting:
                # No extra turn of the event loop to wait for company: the
                # runner starts after the greenlets already scheduled (the
                # rest of a storm's frames), so they have joined by now, and
                # a lone login on a busy loop is not delayed by a full turn.
                batch = self._waiting[: self.max_batch]
                del self._waiting[: len(batch)]
                self._commit(batch)
        finally:
            self._runner = None

    def _commit(self, batch: list[tuple[Item, AsyncResult]]) -> None:
        items = [item for item, _ in batch]
        self.batches += 1
        try:
            answers = self.db.run_core(lambda connection: self.work(connection, items))
        except Exception as error:
            if len(batch) == 1 or is_unavailable(error):  # no item would fare better alone
                for _, answer in batch:
                    answer.set_exception(error)
                return
            log.debug("%s: a batch of %d refused (%s); one by one", self.name, len(batch), error)
            for pair in batch:
                self._commit([pair])
            return
        for (_, answer), value in zip(batch, answers, strict=True):
            answer.set(value)


def drain(timeout: float) -> int:
    """Wait up to `timeout` seconds until nothing is queued or running in any
    group commit of this process (an answer may queue more: a login's write
    lets its info message's report go). Returns how many are still busy."""
    deadline = time.monotonic() + timeout
    while True:
        runners = [group._runner for group in list(_EVERY) if group._runner is not None]
        left = deadline - time.monotonic()
        if not runners or left <= 0:
            return len(runners)
        gevent.joinall(runners, timeout=left)
