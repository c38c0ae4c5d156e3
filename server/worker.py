"""The worker thread: takes jobs from the queue one at a time and runs them through a backend
(server/backends.py: the Executor in this process by default; server/scheduler.py's PoolWorker
subclasses this for several backends, e.g. Ray actors).

The executor stays off the event loop (a prompt may sample for minutes); its events come back
through `JobEvents` (the executor's sink), which turns them into websocket messages for the hub
(`Hub.post_threadsafe`). protocol.md 4 order at the end of a job: the terminal event
(`execution_success` / `_error` / `_interrupted`), then `status`, then `executing {node: null}`,
and only once the history entry exists, so the executor's own terminal events are held back
until the entry is in the history (memory; SQLite in batches, see queue_store.py).
`progress_state` is synthesised here from `executing` / `progress` / `executed`.
"""
from __future__ import annotations

import inspect
import io
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from graph import events as ev
from graph.executor import Executor, RunResult
from nodes.folders import ModelFolders, use_folders

from .backends import Backend, InProcessBackend, RunRequest, WorkerLost
from .queue_store import HistoryBook, Job, JobQueue, QueueStore
from .websocket import Hub, Preview

log = logging.getLogger("easel.server")

SAVE_DELAY = 0.05      # seconds a finished job may wait for its history commit while jobs keep coming
SAVE_BATCH = 256       # or this many jobs
HELD = (ev.EXECUTION_SUCCESS, ev.EXECUTION_ERROR, ev.EXECUTION_INTERRUPTED)
PREVIEW_MAX_SIZE = 512


def history_entry(job: Job, status_str: str, outputs: dict[str, Any],
                  messages: list[tuple[str, dict[str, Any]]],
                  node_records: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The `/history` entry of protocol.md 3.3, plus `node_records` (node id -> {name: data}: what
    nodes recorded for the history, e.g. `lora_coverage`; ComfyUI clients ignore the extra key)."""
    return {"prompt": job.queue_item(),
            "outputs": outputs,
            "status": {"status_str": status_str, "completed": status_str == "success",
                       "messages": [[name, data] for name, data in messages]},
            "meta": {nid: {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
                     for nid in outputs},
            # JSON-safe now (a plugin may record any object): /history answers from memory
            "node_records": ev.json_safe(node_records or {})}


def _encode_preview(image: Any) -> tuple[bytes, str] | None:
    """A PIL image (or ComfyUI's `(format, image, max_size)` tuple) -> (bytes, "JPEG"|"PNG")."""
    fmt, max_size = "JPEG", PREVIEW_MAX_SIZE
    if isinstance(image, tuple) and len(image) == 3:
        fmt, image, max_size = str(image[0]).upper(), image[1], int(image[2] or PREVIEW_MAX_SIZE)
        fmt = "PNG" if fmt == "PNG" else "JPEG"
    if not hasattr(image, "save"):
        return None
    if max(image.size) > max_size:
        image = image.copy()
        image.thumbnail((max_size, max_size))
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), fmt


class JobEvents:
    """The executor's sink for one job: routing, progress_state, previews, held terminal events."""

    def __init__(self, worker: Worker, job: Job, slot: Any = None) -> None:
        self.worker, self.job = worker, job
        # where the job runs: has current_node, pending_interrupt and backend (the Worker itself
        # in-process, a scheduler.Slot in a pool)
        self.slot = slot if slot is not None else worker
        self.sid = job.client_id
        self.hub = worker.hub
        method = job.extra_data.get("preview_method") or worker.preview_method
        self.previews = str(method).lower() not in ("none", "", "false")
        self.previews_requested = bool(job.extra_data.get("preview_method")) and self.previews
        self.preview_method = str(method).lower() if self.previews else "none"   # what the sampler makes
        self.held: list[tuple[str, dict[str, Any]]] = []
        self.states: dict[str, dict[str, Any]] = {}
        self.running_node: str | None = None

    # routing: job-level events only to the job's client; progress-like ones broadcast without one
    def to_client(self, event: str, data: dict[str, Any]) -> None:
        if self.sid is not None:
            self.hub.post_threadsafe((event, data, self.sid))

    def to_client_or_all(self, event: str, data: dict[str, Any]) -> None:
        self.hub.post_threadsafe((event, data, self.sid))

    def progress_state(self) -> None:
        self.to_client_or_all("progress_state", {"prompt_id": self.job.prompt_id,
                                                 "nodes": {k: dict(v) for k, v in self.states.items()}})

    def set_state(self, node_id: str, state: str, value: float | None = None, total: float | None = None) -> None:
        entry = self.states.setdefault(node_id, {
            "value": 0, "max": 1, "state": state, "node_id": node_id, "prompt_id": self.job.prompt_id,
            "display_node_id": node_id, "parent_node_id": None, "real_node_id": node_id})
        entry["state"] = state
        if value is not None:
            entry["value"] = value
        if total is not None:
            entry["max"] = total
        if state == "finished":
            entry["value"] = entry["max"]

    def finish_running(self, state: str = "finished") -> None:
        if self.running_node is not None:
            self.set_state(self.running_node, state)
            self.running_node = None
            self.progress_state()

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == ev.EXECUTING:
            node = data.get("node")
            if node is None:
                return                   # the worker sends its own after the history entry
            self.finish_running()
            self.running_node = node
            self.slot.current_node = node
            self.worker.compat_set(last_node_id=node)
            self.set_state(node, "running")
            self.progress_state()
            self.to_client(event, data)
        elif event == ev.PROGRESS:
            node = data.get("node")
            preview = data.get("preview")
            payload = {k: v for k, v in data.items() if k != "preview"}
            if node is not None:
                self.set_state(node, "running", data.get("value"), data.get("max"))
            self.to_client_or_all(event, payload)
            self.progress_state()
            if preview is not None and self.previews and self.hub.wants_previews(self.sid, self.previews_requested):
                self.send_preview(node, preview)
        elif event == ev.EXECUTED:
            if data.get("node") == self.running_node:
                self.finish_running()
            self.to_client(event, data)
        elif event in HELD:
            if event != ev.EXECUTION_SUCCESS:
                self.finish_running("error")
            else:
                self.finish_running()
            self.held.append((event, data))
        elif event == ev.EXECUTION_START:
            if self.slot.pending_interrupt == self.job.prompt_id:
                self.slot.backend.interrupt()
            self.to_client(event, data)
        elif event == ev.EXECUTION_CACHED:
            self.to_client(event, data)
        elif event in (ev.WARNING, ev.NODE_RECORD):    # about this job: its client only
            self.to_client(event, data)
        elif event == ev.EXPLAIN:
            log.debug("node %s (%s) runs: %s", data.get("node"), data.get("class_type"), "; ".join(data.get("reasons", [])))
        else:                            # plugin messages emitted through the runtime
            self.to_client_or_all(event, data)

    def send_preview(self, node: str | None, image: Any) -> None:
        try:
            encoded = _encode_preview(image)
        except Exception:
            log.exception("preview of node %s could not be encoded", node)
            return
        if encoded is None:
            return
        meta = {"node_id": node, "prompt_id": self.job.prompt_id, "display_node_id": node,
                "parent_node_id": None, "real_node_id": node}
        self.hub.post_threadsafe(Preview(self.sid, encoded[0], encoded[1], meta, self.previews_requested))


class Worker:
    """One thread running the executor over the queue."""

    def __init__(self, executor: Executor, queue: JobQueue, history: HistoryBook, store: QueueStore,
                 hub: Hub, folders: ModelFolders, preview_method: str = "none",
                 prepare: Callable[[Job], None] | None = None, compat: Any = None,
                 specs: Callable[[], Any] | None = None, backend: Backend | None = None) -> None:
        self.executor, self.queue, self.history, self.store, self.hub = executor, queue, history, store, hub
        self.backend: Backend = backend if backend is not None else InProcessBackend(executor)
        self.folders = folders
        self.preview_method = preview_method
        self.prepare = prepare           # e.g. ensure_demo_files before a run
        self.compat = compat             # PromptServer.instance, for plugins reading client_id etc.
        # the server's short-lived SpecTable, handed to executors that accept one (saves re-reading
        # every node class, and the model-file listings of loaders, for each run)
        self.specs = specs if specs is not None and "specs" in inspect.signature(executor.run).parameters else None
        self.name = "local"
        self.current_node: str | None = None
        self.pending_interrupt: str | None = None
        self.free_request: dict[str, bool] = {}
        self.jobs_done = 0
        self._stopping = False
        self._unsaved: list[tuple[str, Any]] = []
        self._unsaved_since = 0.0
        self._save_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def compat_set(self, **values: Any) -> None:
        if self.compat is not None:
            for key, value in values.items():
                setattr(self.compat, key, value)

    # -- control (any thread) ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="easel-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.backend.interrupt()
        self.queue.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Stop the running job (only if it is `prompt_id`, when given); whether one was asked."""
        running = self.queue.running
        if running is None or (prompt_id is not None and running.prompt_id != prompt_id):
            return False
        self.pending_interrupt = running.prompt_id
        self.backend.interrupt()
        return True

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        self.free_request = {"unload_models": unload_models or self.free_request.get("unload_models", False),
                             "free_memory": free_memory or self.free_request.get("free_memory", False)}
        self.queue.wake()

    def connect_replay(self, sid: str) -> list[tuple[str, dict[str, Any]]]:
        """What a (re)connecting client that owns the running job should hear: the current node."""
        running = self.queue.running
        if running is None or running.client_id != sid or self.current_node is None:
            return []
        return [("executing", {"node": self.current_node, "display_node": self.current_node,
                               "prompt_id": running.prompt_id})]

    # -- the thread -------------------------------------------------------------------------------
    def _main(self) -> None:
        with use_folders(self.folders):
            job: Job | None = None
            while not self._stopping:
                if job is None:
                    self._save()                 # idle: the finished jobs go to disk now
                    self._apply_free()
                    job = self.queue.take(timeout=0.5)
                    if job is None:
                        continue
                    self._apply_free()           # a /free that came while waiting goes before this job
                job = self._run(job)
            self._save()

    def _apply_free(self) -> None:
        request, self.free_request = self.free_request, {}
        if request.get("free_memory") or request.get("unload_models"):
            self.backend.free(bool(request.get("unload_models")), bool(request.get("free_memory")))

    def _save(self) -> None:
        """Write the finished jobs not on disk yet (history entries in, queue rows out) in one commit."""
        with self._save_lock:
            if not self._unsaved:
                return
            ops, self._unsaved = self._unsaved, []
        try:
            self.store.write([*ops, self.store.op_trim()])
        except Exception:
            log.exception("writing %d history entries failed", len(ops) // 3)

    def _run(self, job: Job) -> Job | None:
        """Run `job`; return the next job when one is waiting."""
        job.start_time = int(time.time() * 1000)
        self.store.mark_running(job.prompt_id)
        events = JobEvents(self, job)
        self.current_node = None
        self.compat_set(client_id=job.client_id, last_prompt_id=job.prompt_id)
        result = self._execute(job, events)
        self.current_node = None
        self.pending_interrupt = None
        self.store.mark_running(None)
        if self._stopping and result.status == "interrupted":
            # a graceful shutdown stopped it: it stays queued on disk and runs at the next start
            self.queue.done(job)
            return None
        self._record(job, result)
        nxt = None if self._stopping or self.free_request else self.queue.take(timeout=0)
        if nxt is None or time.monotonic() - self._unsaved_since > SAVE_DELAY or len(self._unsaved) > SAVE_BATCH * 3:
            self._save()
        self._announce(job, events)
        return nxt

    def _record(self, job: Job, result: RunResult) -> None:
        """The history entry in memory now, on disk with the next batch; the job leaves the queue."""
        status_str = "success" if result.status == "success" else "error"
        entry = history_entry(job, status_str, result.outputs, result.messages, result.node_records)
        self.history.add(job.prompt_id, entry)
        self.queue.done(job)
        with self._save_lock:
            if not self._unsaved:
                self._unsaved_since = time.monotonic()
            self._unsaved.extend(self.store.op_finish(job.prompt_id, entry))
        self.jobs_done += 1

    def _announce(self, job: Job, events: JobEvents) -> None:
        """The end of a job on the websocket (once its history entry exists): held terminal event,
        status, `executing {node: null}`."""
        for event, data in events.held:
            if event == ev.EXECUTION_INTERRUPTED:
                self.hub.post_threadsafe((event, data, None))       # ComfyUI broadcasts it
            else:
                events.to_client(event, data)
        self.hub.post_threadsafe(("status", {"status": {"exec_info": {"queue_remaining": self.queue.remaining()}}}, None))
        events.to_client(ev.EXECUTING, {"node": None, "prompt_id": job.prompt_id})

    def _execute(self, job: Job, events: JobEvents, backend: Backend | None = None) -> RunResult:
        backend = backend if backend is not None else self.backend
        try:
            if self.prepare is not None:
                self.prepare(job)
            specs = self.specs() if self.specs is not None and job.report is not None else None
            request = RunRequest(job.prompt, job.prompt_id,
                                 {**job.extra_data, **job.sensitive, "preview_method": events.preview_method},
                                 job.targets)
            result = backend.run(request, events, report=job.report, specs=specs)
        except WorkerLost:
            raise
        except Exception as exc:   # noqa: BLE001 - the executor itself failed: report it like a node error
            payload: dict[str, Any] = {
                "prompt_id": job.prompt_id, "node_id": None, "node_type": None, "executed": [],
                "exception_message": f"{type(exc).__name__}: {exc}", "exception_type": type(exc).__name__,
                "traceback": traceback.format_exception(exc), "current_inputs": {}, "current_outputs": [],
                "timestamp": ev.timestamp_ms()}
            events(ev.EXECUTION_ERROR, payload)
            return RunResult(job.prompt_id, "error", error=payload, messages=[(ev.EXECUTION_ERROR, payload)])
        finally:
            job.report = None
        if result.status == "invalid":
            report = result.validation
            payload = {"prompt_id": job.prompt_id, "node_id": None, "node_type": None, "executed": [],
                       "exception_message": "the prompt no longer validates: " + (report.describe() if report else ""),
                       "exception_type": "ValidationError", "traceback": [], "current_inputs": {},
                       "current_outputs": [], "timestamp": ev.timestamp_ms()}
            events(ev.EXECUTION_ERROR, payload)
            result.messages.append((ev.EXECUTION_ERROR, payload))
        return result


def crashed_entry(job: Job, attempts: int) -> dict[str, Any]:
    """History entry of a job the server died on twice (it is not tried again)."""
    reason = (f"the server process stopped while this prompt was running ({attempts} attempts); "
              "it was not retried again")
    payload: dict[str, Any] = {
        "prompt_id": job.prompt_id, "node_id": None, "node_type": None, "executed": [],
        "exception_message": reason, "exception_type": "ServerCrashed", "traceback": [],
        "current_inputs": {}, "current_outputs": [], "timestamp": int(time.time() * 1000)}
    return history_entry(job, "error", {}, [(ev.EXECUTION_ERROR, payload)])
