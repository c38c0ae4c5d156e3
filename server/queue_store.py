"""The job queue and the history: in memory for speed, in SQLite so that nothing accepted is lost.

`JobQueue` is the in-memory priority queue the worker thread takes from (a heap on `number`).
`HistoryBook` holds finished entries in completion order. `QueueStore` persists both in one SQLite
file under the base directory (WAL journal, `synchronous=NORMAL`: a commit survives a crash of the
process, which is what a SIGKILL or an exception in a node looks like).

Write pattern (protocol.md 3.1 wants the job queued before the 200 goes out):
- `POST /prompt` hands its job to `AcceptBatcher.add`; the jobs that arrive while the previous
  batch is being committed are inserted together in
  one transaction, then all of them enter the memory queue and their requests are answered.
  Concurrent clients thus share commits. An answered prompt is on disk.
- the worker marks the job it starts in a small "running" file (`pwrite` of the id, no commit:
  the page cache survives a crash of the process), and writes finished jobs (history entry in,
  queue row out) in batches: at the latest 50 ms after a job ended, or as soon as the queue is
  idle. A job whose batch was not written yet when the process died is still in `jobs` and runs
  again after the restart (nothing accepted is lost; at worst a finished prompt runs twice).

Restart: rows still in `jobs` are pending again. The job named in the running file was running
when the process died: its `attempts` goes up by one and it runs once more; a job that had already
been retried (`attempts > MAX_RETRIES`) is moved to the history as failed with the reason, so a
prompt that kills the server cannot keep it down.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SENSITIVE_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
MAX_RETRIES = 1   # a job that was running when the process died is retried this many times
MARKER_SIZE = 128

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    prompt_id TEXT PRIMARY KEY,
    number    REAL NOT NULL,
    body      TEXT NOT NULL,          -- JSON {prompt, extra_data, outputs, targets}
    attempts  INTEGER NOT NULL DEFAULT 0,
    created   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    entry     TEXT NOT NULL           -- JSON, the /history entry
);
"""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


@dataclass
class Job:
    prompt_id: str
    number: float
    prompt: dict[str, Any]
    extra_data: dict[str, Any]                  # secrets removed (they live in `sensitive`, memory only)
    outputs: list[str]                          # output node ids validation kept
    targets: list[str] | None = None            # partial_execution_targets
    attempts: int = 0
    sensitive: dict[str, Any] = field(default_factory=dict)
    report: Any = None                          # the ValidationReport from POST time (memory only)
    start_time: int | None = None               # ms, when the worker took it (memory only)

    @property
    def client_id(self) -> str | None:
        cid = self.extra_data.get("client_id")
        return str(cid) if cid else None

    @property
    def create_time(self) -> int:
        return int(self.extra_data.get("create_time") or 0)

    def queue_item(self) -> list[Any]:
        """The 5-element `/queue` item: [number, prompt_id, prompt, extra_data, outputs]."""
        number = int(self.number) if float(self.number).is_integer() else self.number
        return [number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    def body(self) -> str:
        return _dumps({"prompt": self.prompt, "extra_data": self.extra_data, "outputs": self.outputs,
                       "targets": self.targets})


def split_sensitive(extra_data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    public = {k: v for k, v in extra_data.items() if k not in SENSITIVE_KEYS}
    secret = {k: extra_data[k] for k in SENSITIVE_KEYS if extra_data.get(k) is not None}
    return public, secret


class QueueStore:
    """The SQLite file. One connection shared by the loop and the worker thread, under a lock."""

    def __init__(self, path: Path, max_history: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_history = max_history
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # checkpoints (the only fsyncs in WAL/NORMAL) every ~32 MB of log instead of every 4 MB
        self._db.execute("PRAGMA wal_autocheckpoint=8000")
        self._db.executescript(SCHEMA)
        self.commits = 0
        self.marker_path = path.with_name(path.name + ".running")
        self._marker = os.open(self.marker_path, os.O_RDWR | os.O_CREAT, 0o644)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._marker)

    # -- the running file -------------------------------------------------------------------------
    def mark_running(self, prompt_id: str | None) -> None:
        """Name the job now running (None: none). One pwrite, no fsync: survives a process crash."""
        text = (prompt_id or "").encode()[:MARKER_SIZE]
        os.pwrite(self._marker, text.ljust(MARKER_SIZE, b" "), 0)

    def read_marker(self) -> str | None:
        raw = os.pread(self._marker, MARKER_SIZE, 0).decode("utf-8", "replace").strip()
        return raw or None

    def _write(self, ops: Iterable[tuple[str, Sequence[Any]]]) -> None:
        with self._lock:
            self._write_locked(ops)

    def _write_locked(self, ops: Iterable[tuple[str, Sequence[Any]]]) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            for sql, params in ops:
                db.execute(sql, params)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        self.commits += 1

    # -- jobs -------------------------------------------------------------------------------------
    @staticmethod
    def op_add(job: Job) -> tuple[str, Sequence[Any]]:
        return ("INSERT OR REPLACE INTO jobs (prompt_id, number, body, attempts, created) VALUES (?, ?, ?, ?, ?)",
                (job.prompt_id, job.number, job.body(), job.attempts, job.create_time))

    @staticmethod
    def op_start(job: Job) -> tuple[str, Sequence[Any]]:
        return ("UPDATE jobs SET attempts = ? WHERE prompt_id = ?", (job.attempts, job.prompt_id))

    @staticmethod
    def op_finish(prompt_id: str, entry: dict[str, Any]) -> list[tuple[str, Sequence[Any]]]:
        return [("DELETE FROM jobs WHERE prompt_id = ?", (prompt_id,)),
                ("DELETE FROM history WHERE prompt_id = ?", (prompt_id,)),
                ("INSERT INTO history (prompt_id, entry) VALUES (?, ?)", (prompt_id, _dumps(entry)))]

    def op_trim(self) -> tuple[str, Sequence[Any]]:
        return ("DELETE FROM history WHERE seq <= (SELECT MAX(seq) FROM history) - ?", (self.max_history,))

    def add_jobs(self, jobs: Sequence[Job]) -> None:
        self._write([self.op_add(job) for job in jobs])

    def try_add_jobs(self, jobs: Sequence[Job]) -> bool:
        """Insert the jobs now if nobody else is writing (False: the caller must use add_jobs)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._write_locked([self.op_add(job) for job in jobs])
        finally:
            self._lock.release()
        return True

    def write(self, ops: Sequence[tuple[str, Sequence[Any]]]) -> None:
        if ops:
            self._write(ops)

    def delete_jobs(self, prompt_ids: Sequence[str]) -> None:
        self._write([("DELETE FROM jobs WHERE prompt_id = ?", (pid,)) for pid in prompt_ids])

    # -- history ----------------------------------------------------------------------------------
    def delete_history(self, prompt_ids: Sequence[str] | None) -> None:
        if prompt_ids is None:
            self._write([("DELETE FROM history", ())])
        else:
            self._write([("DELETE FROM history WHERE prompt_id = ?", (pid,)) for pid in prompt_ids])

    # -- start-up ---------------------------------------------------------------------------------
    def load(self) -> tuple[list[Job], list[tuple[str, dict[str, Any]]]]:
        """Pending jobs (in number order) and the last `max_history` history entries."""
        with self._lock:
            rows = self._db.execute("SELECT prompt_id, number, body, attempts FROM jobs ORDER BY number, created").fetchall()
            hist = self._db.execute("SELECT prompt_id, entry FROM history ORDER BY seq DESC LIMIT ?",
                                    (self.max_history,)).fetchall()
        jobs = []
        for prompt_id, number, body, attempts in rows:
            data = json.loads(body)
            jobs.append(Job(prompt_id, number, data["prompt"], data["extra_data"], data["outputs"],
                            data.get("targets"), attempts))
        return jobs, [(pid, json.loads(entry)) for pid, entry in reversed(hist)]


class JobQueue:
    """Pending jobs by `number` (smallest first) and the running one; thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, str]] = []
        self._pending: dict[str, Job] = {}
        self._seq = itertools.count()
        self.running: Job | None = None
        self._counter = 0
        self._wakes = 0

    def next_number(self, front: bool) -> int:
        with self._cond:
            self._counter += 1
            return -self._counter if front else self._counter

    def bump_counter(self, at_least: float) -> None:
        with self._cond:
            self._counter = max(self._counter, int(abs(at_least)))

    def put(self, jobs: Sequence[Job]) -> None:
        with self._cond:
            for job in jobs:
                self._pending[job.prompt_id] = job
                heapq.heappush(self._heap, (job.number, next(self._seq), job.prompt_id))
            self._cond.notify()

    def take(self, timeout: float | None = None) -> Job | None:
        """The next job (now marked running), waiting up to `timeout`; None when there is none
        or when `wake()` was called meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            wakes = self._wakes
            while True:
                while self._heap:
                    _, _, prompt_id = heapq.heappop(self._heap)
                    job = self._pending.pop(prompt_id, None)
                    if job is not None:
                        self.running = job
                        return job
                remaining = None if deadline is None else deadline - time.monotonic()
                if (remaining is not None and remaining <= 0) or self._wakes != wakes:
                    return None
                self._cond.wait(remaining)

    def done(self, job: Job) -> None:
        with self._cond:
            if self.running is job:
                self.running = None

    def wake(self) -> None:
        with self._cond:
            self._wakes += 1
            self._cond.notify_all()

    def remove(self, prompt_ids: Iterable[str]) -> list[Job]:
        with self._cond:
            return [job for pid in prompt_ids if (job := self._pending.pop(pid, None)) is not None]

    def clear(self) -> list[Job]:
        with self._cond:
            jobs = list(self._pending.values())
            self._pending.clear()
            self._heap.clear()
            return jobs

    def get(self, prompt_id: str) -> Job | None:
        with self._cond:
            if self.running is not None and self.running.prompt_id == prompt_id:
                return self.running
            return self._pending.get(prompt_id)

    def snapshot(self) -> tuple[Job | None, list[Job]]:
        with self._cond:
            pending = sorted(self._pending.values(), key=lambda j: j.number)
            return self.running, pending

    def remaining(self) -> int:
        """Pending + running, what `status.exec_info.queue_remaining` reports."""
        with self._cond:
            return len(self._pending) + (self.running is not None)


class HistoryBook:
    """Finished entries in completion order, at most `max_items`; thread-safe."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def add(self, prompt_id: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self._entries.pop(prompt_id, None)
            self._entries[prompt_id] = entry
            while len(self._entries) > self.max_items:
                self._entries.popitem(last=False)

    def get(self, prompt_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._entries.get(prompt_id)

    def items(self, max_items: int | None = None, offset: int = 0) -> list[tuple[str, dict[str, Any]]]:
        """Entries in completion order; `max_items` takes the last N (after skipping `offset` from the end)."""
        with self._lock:
            items = list(self._entries.items())
        if offset:
            items = items[:-offset] if offset < len(items) else []
        if max_items is not None:
            items = items[-max_items:] if max_items > 0 else []
        return items

    def delete(self, prompt_ids: Iterable[str]) -> None:
        with self._lock:
            for pid in prompt_ids:
                self._entries.pop(pid, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class AcceptBatcher:
    """Group commit for `POST /prompt`, off the event loop.

    Jobs wait in a list; one flusher task commits the whole list (on the loop when the database
    is free, else in a writer thread so the loop never waits for the worker's commit), and
    whatever arrives meanwhile forms the next batch. Only after its commit is
    a job put in the memory queue and its request answered."""

    def __init__(self, store: QueueStore, queue: JobQueue, on_queued: Any) -> None:
        self.store, self.queue, self.on_queued = store, queue, on_queued
        self._jobs: list[Job] = []
        self._futures: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="easel-db")
        self.batches = 0

    async def add(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._jobs.append(job)
        self._futures.append(future)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)            # requests parsed in this loop turn join the batch
        while self._jobs:
            jobs, futures = self._jobs, self._futures
            self._jobs, self._futures = [], []
            try:
                if not self.store.try_add_jobs(jobs):   # the worker is writing: wait in a thread
                    await loop.run_in_executor(self._pool, self.store.add_jobs, jobs)
            except Exception as exc:     # the disk said no: every request of the batch gets the error
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.queue.put(jobs)
            self.on_queued()
            for future in futures:
                if not future.done():
                    future.set_result(None)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
