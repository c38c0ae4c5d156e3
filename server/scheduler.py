"""Several workers over the one queue: model-affinity scheduling, lost workers, re-queue once.

`PoolWorker` replaces the single worker thread when the server runs prompts on a pool of backends
(Ray actors, server/ray_backend.py). One dispatcher thread matches pending jobs with free slots
(`assign`); each `Slot` has a thread that runs its job on its backend and reports it exactly as
the in-process worker does (server/worker.py: history entry first, then the held terminal event,
`status`, `executing {node: null}`).

The policy (`assign`), for the first LOOKAHEAD pending jobs in queue order:
1. a job that waited `wait` seconds or more takes any free worker (best match first): no prompt
   waits long while a worker is idle;
2. a job whose models (checkpoint, LoRAs...: backends.prompt_models) a free worker holds goes to
   the free worker holding most of them;
3. a job whose models a busy worker holds waits for it (bounded by rule 1);
4. any other job takes the free worker whose cache the other pending jobs want least, then the
   least loaded (fewest models held, fewest jobs run).
A job re-queued after a lost worker avoids that worker's slot while another one is free.

Faults: a backend that raises `WorkerLost` (its actor died, or stopped answering within the
heartbeat) is closed and replaced; its job is re-queued once (attempts persisted in SQLite), and a
job that loses a second worker ends failed with the reasons. A job already in the history is never
run again. Nothing accepted is lost: the SQLite row stays until the history entry is written.
"""
from __future__ import annotations

import heapq
import logging
import queue as queue_mod
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from graph import events as ev
from nodes.folders import use_folders

from .backends import Backend, WorkerLost, prompt_models
from .queue_store import MAX_RETRIES, Job, JobQueue
from .worker import JobEvents, Worker, history_entry

log = logging.getLogger("easel.server")

AFFINITY_WAIT = 3.0   # seconds a job may wait for the busy worker holding its models
LOOKAHEAD = 64        # pending jobs the dispatcher looks at each round
REPLACE_RETRY = 5.0   # seconds between attempts to start a replacement worker


@dataclass(frozen=True)
class WorkerView:
    """What the policy sees of one worker."""
    index: int
    free: bool
    held: frozenset[str]
    load: int                      # jobs run so far


@dataclass(frozen=True)
class PendingView:
    """What the policy sees of one pending job."""
    prompt_id: str
    models: frozenset[str]
    waited: float                  # seconds since it became pending
    avoid: frozenset[int] = frozenset()


def assign(pending: Sequence[PendingView], workers: Sequence[WorkerView], wait: float) -> list[tuple[str, int]]:
    """(prompt_id, worker index) pairs to start now; see the module docstring for the rules."""
    free = {w.index: w for w in workers if w.free}
    busy = [w for w in workers if not w.free]
    out: list[tuple[str, int]] = []
    placed: set[str] = set()

    def candidates(job: PendingView) -> list[WorkerView]:
        allowed = [w for w in free.values() if w.index not in job.avoid]
        return allowed or (list(free.values()) if job.waited >= wait else [])

    def wanted_by_others(w: WorkerView, job: PendingView) -> int:
        return sum(1 for p in pending if p.prompt_id not in placed and p is not job and p.models & w.held)

    def place(job: PendingView, pick: WorkerView) -> None:
        out.append((job.prompt_id, pick.index))
        placed.add(job.prompt_id)
        del free[pick.index]

    def best_match(job: PendingView, options: list[WorkerView]) -> WorkerView | None:
        scored = [(len(job.models & w.held), w) for w in options]
        scored = [(n, w) for n, w in scored if n > 0]
        if not scored:
            return None
        return max(scored, key=lambda nw: (nw[0], -nw[1].load, -nw[1].index))[1]

    def least_wanted(job: PendingView, options: list[WorkerView]) -> WorkerView:
        return min(options, key=lambda w: (wanted_by_others(w, job), len(w.held), w.load, w.index))

    for rule in (1, 2, 4):
        for job in pending:
            if not free:
                return out
            if job.prompt_id in placed:
                continue
            options = candidates(job)
            if not options:
                continue
            if rule == 1:
                if job.waited >= wait:
                    place(job, best_match(job, options) or least_wanted(job, options))
            elif rule == 2:
                match = best_match(job, options)
                if match is not None:
                    place(job, match)
            else:
                if job.models and any(job.models & w.held for w in busy):
                    continue                    # rule 3: its worker is busy; wait for it
                place(job, least_wanted(job, options))
    return out


class PoolQueue(JobQueue):
    """The job queue with several running jobs (one per worker)."""

    def __init__(self) -> None:
        self._running: dict[str, Job] = {}
        self._since: dict[str, float] = {}
        super().__init__()

    @property                                      # type: ignore[override]
    def running(self) -> Job | None:
        """The first running job (what the single-worker routes show)."""
        with self._cond:
            return next(iter(self._running.values()), None)

    @running.setter
    def running(self, value: Job | None) -> None:   # JobQueue.__init__ sets it; nothing to keep
        if value is not None:
            raise AttributeError("PoolQueue.running is read-only; jobs start through start()")

    def running_jobs(self) -> list[Job]:
        with self._cond:
            return list(self._running.values())

    def put(self, jobs: Sequence[Job]) -> None:
        now = time.monotonic()
        with self._cond:
            for job in jobs:
                self._pending[job.prompt_id] = job
                self._since.setdefault(job.prompt_id, now)
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> Job | None:
        raise RuntimeError("a PoolQueue hands out jobs through PoolWorker's dispatcher, not take()")

    def head(self, count: int) -> list[tuple[Job, float]]:
        """The first `count` pending jobs in queue order, with their seconds waited."""
        now = time.monotonic()
        with self._cond:
            jobs = heapq.nsmallest(count, self._pending.values(), key=lambda j: j.number)
            return [(job, now - self._since.get(job.prompt_id, now)) for job in jobs]

    def start(self, prompt_id: str) -> Job | None:
        with self._cond:
            job = self._pending.pop(prompt_id, None)
            if job is not None:
                self._running[prompt_id] = job
                self._since.pop(prompt_id, None)
            return job

    def done(self, job: Job) -> None:
        with self._cond:
            if self._running.get(job.prompt_id) is job:
                del self._running[job.prompt_id]
            self._cond.notify_all()

    def requeue(self, job: Job) -> None:
        """A running job goes back to pending (same number, so it keeps its place)."""
        with self._cond:
            self._running.pop(job.prompt_id, None)
        self.put([job])

    def wait_change(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def remove(self, prompt_ids: Any) -> list[Job]:
        with self._cond:
            ids = list(prompt_ids)
            for pid in ids:
                self._since.pop(pid, None)
            return super().remove(ids)

    def clear(self) -> list[Job]:
        with self._cond:
            self._since.clear()
            return super().clear()

    def get(self, prompt_id: str) -> Job | None:
        with self._cond:
            return self._running.get(prompt_id) or self._pending.get(prompt_id)

    def snapshot(self) -> tuple[Job | None, list[Job]]:
        with self._cond:
            running = next(iter(self._running.values()), None)
            return running, sorted(self._pending.values(), key=lambda j: j.number)

    def remaining(self) -> int:
        with self._cond:
            return len(self._pending) + len(self._running)


class Slot:
    """One worker of the pool: its backend, the job it runs, what it holds."""

    def __init__(self, index: int, backend: Backend) -> None:
        self.index, self.backend = index, backend
        self.job: Job | None = None
        self.ready = True                       # False while its backend is being replaced
        self.held: frozenset[str] = frozenset()
        self.jobs_done = 0
        self.current_node: str | None = None
        self.pending_interrupt: str | None = None
        self.free_request: dict[str, bool] = {}
        self.inbox: queue_mod.Queue[Job | None] = queue_mod.Queue()
        self.thread: threading.Thread | None = None

    @property
    def free(self) -> bool:
        return self.ready and self.job is None

    def view(self) -> WorkerView:
        return WorkerView(self.index, self.free, self.held, self.jobs_done)


class PoolWorker(Worker):
    """The worker for a pool of backends: same interface as `Worker` (start/stop/interrupt/...)."""

    def __init__(self, *args: Any, backends: Sequence[Backend],
                 make_backend: Callable[[int], Backend] | None = None,
                 affinity_wait: float = AFFINITY_WAIT, **kwargs: Any) -> None:
        if not backends:
            raise ValueError("PoolWorker needs at least one backend")
        super().__init__(*args, backend=backends[0], **kwargs)
        if not isinstance(self.queue, PoolQueue):
            raise TypeError(f"PoolWorker needs a PoolQueue, got {type(self.queue).__name__}")
        self.queue: PoolQueue = self.queue
        self.slots = [Slot(i, b) for i, b in enumerate(backends)]
        self.make_backend = make_backend
        self.affinity_wait = affinity_wait
        self.name = "pool"
        self.lost: dict[str, list[str]] = {}           # prompt id -> why each worker was lost
        self.avoid: dict[str, set[int]] = {}           # prompt id -> slots it was lost on
        self.replaced = 0
        self._threads: list[threading.Thread] = []

    # -- control ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.store.mark_running(None)        # the server process runs no node: nothing to blame it for
        for slot in self.slots:
            slot.thread = threading.Thread(target=self._slot_main, args=(slot,), name=f"easel-slot-{slot.index}",
                                           daemon=True)
            slot.thread.start()
            self._threads.append(slot.thread)
        thread = threading.Thread(target=self._dispatch_main, name="easel-dispatcher", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        for slot in self.slots:
            if slot.job is not None:
                slot.backend.interrupt()
            slot.inbox.put(None)
        self.queue.poke()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._save()
        for slot in self.slots:
            try:
                slot.backend.close()
            except Exception:
                log.exception("closing worker %s failed", slot.backend.name)

    def interrupt(self, prompt_id: str | None = None) -> bool:
        asked = False
        for slot in self.slots:
            job = slot.job
            if job is not None and (prompt_id is None or job.prompt_id == prompt_id):
                slot.pending_interrupt = job.prompt_id
                slot.backend.interrupt()
                asked = True
        return asked

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        for slot in self.slots:
            slot.free_request = {"unload_models": unload_models or slot.free_request.get("unload_models", False),
                                 "free_memory": free_memory or slot.free_request.get("free_memory", False)}
            slot.inbox.put(None)                 # an idle slot applies it now

    def connect_replay(self, sid: str) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for slot in self.slots:
            job, node = slot.job, slot.current_node
            if job is not None and job.client_id == sid and node is not None:
                out.append(("executing", {"node": node, "display_node": node, "prompt_id": job.prompt_id}))
        return out

    # -- dispatcher -------------------------------------------------------------------------------
    def _dispatch_main(self) -> None:
        while not self._stopping:
            head = self.queue.head(LOOKAHEAD)
            if not head:
                self._save()
                self.queue.wait_change(0.5)
                continue
            views = [PendingView(job.prompt_id, prompt_models(job.prompt), waited,
                                 frozenset(self.avoid.get(job.prompt_id, ()))) for job, waited in head]
            pairs = assign(views, [slot.view() for slot in self.slots], self.affinity_wait)
            for prompt_id, index in pairs:
                job = self.queue.start(prompt_id)
                if job is None:                    # deleted meanwhile
                    continue
                slot = self.slots[index]
                slot.job = job
                slot.inbox.put(job)
            if not pairs:
                self.queue.wait_change(0.05)       # a slot freeing up or a new job pokes it sooner

    # -- one slot ---------------------------------------------------------------------------------
    def _slot_main(self, slot: Slot) -> None:
        with use_folders(self.folders):
            while not self._stopping:
                try:
                    job = slot.inbox.get(timeout=0.5)
                except queue_mod.Empty:
                    job = None
                self._slot_free(slot)
                if job is None or self._stopping:
                    if job is not None:
                        slot.job = None
                        self.queue.requeue(job)
                    continue
                try:
                    self._run_on(slot, job)
                finally:
                    slot.job = None
                    slot.current_node = None
                    slot.pending_interrupt = None
                    self.queue.poke()

    def _slot_free(self, slot: Slot) -> None:
        request, slot.free_request = slot.free_request, {}
        if request.get("unload_models") or request.get("free_memory"):
            try:
                slot.backend.free(bool(request.get("unload_models")), bool(request.get("free_memory")))
                slot.held = slot.backend.models()
            except WorkerLost as exc:
                self._replace(slot, str(exc))

    def _run_on(self, slot: Slot, job: Job) -> None:
        if self.history.get(job.prompt_id) is not None:   # it finished already: never twice
            self.queue.done(job)
            return
        job.start_time = int(time.time() * 1000)
        events = JobEvents(self, job, slot)
        self.compat_set(client_id=job.client_id, last_prompt_id=job.prompt_id)
        try:
            result = self._execute(job, events, slot.backend)
        except WorkerLost as exc:
            self._lost(slot, job, events, str(exc))
            return
        slot.held = slot.backend.models()
        slot.jobs_done += 1
        if self._stopping and result.status == "interrupted":
            self.queue.done(job)                         # stays on disk; runs at the next start
            return
        self._record(job, result)
        self.lost.pop(job.prompt_id, None)
        self.avoid.pop(job.prompt_id, None)
        if self.queue.remaining() == 0 or time.monotonic() - self._unsaved_since > 0.05:
            self._save()
        self._announce(job, events)

    def _lost(self, slot: Slot, job: Job, events: JobEvents, reason: str) -> None:
        name = slot.backend.name
        log.warning("worker %s lost while running prompt %s: %s", name, job.prompt_id, reason)
        reasons = self.lost.setdefault(job.prompt_id, [])
        reasons.append(f"{name}: {reason}")
        self.avoid.setdefault(job.prompt_id, set()).add(slot.index)
        job.attempts += 1
        slot.ready = False
        slot.job = None
        if job.attempts > MAX_RETRIES:
            self._fail_lost(job, events, reasons)
        else:
            try:
                self.store.write([self.store.op_start(job)])     # the attempt count survives a restart
            except Exception:
                log.exception("saving the attempt count of %s failed", job.prompt_id)
            self.queue.requeue(job)
        self._replace(slot, reason)

    def _fail_lost(self, job: Job, events: JobEvents, reasons: list[str]) -> None:
        message = (f"the prompt was running on {len(reasons)} workers and each was lost "
                   f"({'; '.join(reasons)}); it was not retried again")
        payload: dict[str, Any] = {
            "prompt_id": job.prompt_id, "node_id": events.running_node,
            "node_type": (job.prompt.get(events.running_node) or {}).get("class_type") if events.running_node else None,
            "executed": [], "exception_message": message, "exception_type": "WorkerLost", "traceback": [],
            "current_inputs": {}, "current_outputs": [], "timestamp": ev.timestamp_ms()}
        events.finish_running("error")
        events.held = [(ev.EXECUTION_ERROR, payload)]
        entry = history_entry(job, "error", {}, [(ev.EXECUTION_ERROR, payload)])
        self.history.add(job.prompt_id, entry)
        self.queue.done(job)
        with self._save_lock:
            if not self._unsaved:
                self._unsaved_since = time.monotonic()
            self._unsaved.extend(self.store.op_finish(job.prompt_id, entry))
        self._save()
        self.lost.pop(job.prompt_id, None)
        self.avoid.pop(job.prompt_id, None)
        self._announce(job, events)

    def _replace(self, slot: Slot, reason: str) -> None:
        """Close the lost backend and start a new one in its slot (retrying while the cluster says no)."""
        slot.ready = False
        try:
            slot.backend.close()
        except Exception:
            log.debug("closing lost worker %s failed", slot.backend.name, exc_info=True)
        slot.held = frozenset()
        if self.make_backend is None:
            log.error("worker %s lost (%s) and no way to replace it; the pool has one worker less",
                      slot.backend.name, reason)
            return
        while not self._stopping:
            try:
                slot.backend = self.make_backend(slot.index)
                break
            except Exception:
                log.exception("starting a replacement for worker %d failed; retrying", slot.index)
                time.sleep(REPLACE_RETRY)
        self.replaced += 1
        slot.ready = True
        self.queue.poke()
