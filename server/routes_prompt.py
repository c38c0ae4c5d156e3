"""Queueing and job routes: /prompt, /queue, /interrupt, /free, /history and the jobs API (protocol.md 3.1-3.3)."""
from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from typing import Any

from aiohttp import web

from graph.nodespec import SpecTable
from graph.validate import validate_prompt
from graph.workflow import WorkflowFormatError, check_api_prompt
from nodes.folders import use_folders

from .queue_store import Job, split_sensitive
from .security import json_error, read_json
from .settings import ServerState, state

log = logging.getLogger("easel.server")
routes = web.RouteTableDef()       # every route here also gets its /api twin (app.py)
jobs_routes = web.RouteTableDef()  # declared with /api already (ComfyUI does the same)

JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
PREVIEWABLE = ("images", "video", "gifs", "audio", "3d")


def prompt_error(kind: str, message: str, details: str = "", **extra: Any) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message, "details": details, "extra_info": extra},
                              "node_errors": {}}, status=400)


_ids = random.Random(os.urandom(32))


def new_prompt_id() -> str:
    """A random version-4 UUID. Prompt ids are listed by /queue and /history, not secrets, so a
    PRNG seeded from the OS is enough (os.urandom per prompt costs ~50 µs on a busy VM)."""
    return str(uuid.UUID(int=_ids.getrandbits(128), version=4))


def is_canonical_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def queue_info(st: ServerState) -> dict[str, Any]:
    return {"exec_info": {"queue_remaining": st.queue.remaining()}}


# -- /prompt ------------------------------------------------------------------------------------
@routes.get("/prompt")
async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response(queue_info(state(request)))


@routes.post("/prompt")
async def post_prompt(request: web.Request) -> web.Response:
    st = state(request)
    try:
        body = await read_json(request, dict)
    except web.HTTPBadRequest as exc:
        return prompt_error("invalid_json", "The request body is not a JSON object", exc.text or "")
    if st.compat is not None:
        body = st.compat.trigger_on_prompt(body)
    if "prompt" not in body:
        return prompt_error("no_prompt", "No prompt provided", "No prompt provided")
    try:
        prompt = check_api_prompt(body["prompt"])
    except WorkflowFormatError as exc:
        return prompt_error("invalid_prompt", "The prompt is not an API-format workflow", str(exc))
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and not is_canonical_uuid(prompt_id):
        return prompt_error("invalid_prompt_id", "prompt_id must be a UUID in canonical lowercase form",
                            f"received {prompt_id!r}")
    if prompt_id is not None and (st.queue.get(prompt_id) is not None or st.history.get(prompt_id) is not None):
        return prompt_error("invalid_prompt_id", "prompt_id is already in use", f"{prompt_id} is queued or in the history")
    extra = body.get("extra_data") or {}
    if not isinstance(extra, dict):
        return prompt_error("invalid_prompt", "extra_data must be a JSON object", f"received {type(extra).__name__}")
    number = body.get("number")
    if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))):
        return prompt_error("invalid_prompt", "number must be a number", f"received {number!r}")
    targets = body.get("partial_execution_targets")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, (str, int)) for t in targets)):
        return prompt_error("invalid_prompt", "partial_execution_targets must be a list of node ids", f"received {targets!r}")
    targets = [str(t) for t in targets] if targets else None
    client_id = body.get("client_id")
    if client_id is not None and not isinstance(client_id, str):
        return prompt_error("invalid_prompt", "client_id must be a string", f"received {client_id!r}")

    if st.settings.demo_files:
        await ensure_demo(st, prompt)
    with use_folders(st.folders):
        report = validate_prompt(prompt, spec_table(st), targets)
    if not report.ok:
        return web.json_response(report.to_json(), status=400)

    extra = dict(extra)
    if client_id:
        extra["client_id"] = client_id
    if "comfy_usage_source" not in extra and request.headers.get("Comfy-Usage-Source"):
        extra["comfy_usage_source"] = request.headers["Comfy-Usage-Source"]
    extra["create_time"] = int(time.time() * 1000)
    public, secret = split_sensitive(extra)
    if number is None:
        number = st.queue.next_number(bool(body.get("front")))
    job = Job(prompt_id or new_prompt_id(), number, prompt, public, list(report.outputs), targets,
              sensitive=secret, report=report)
    await st.batcher.add(job)
    return web.json_response({"prompt_id": job.prompt_id, "number": number, "node_errors": report.node_errors})


SPEC_TABLE_SECONDS = 1.0


def spec_table(st: ServerState) -> SpecTable:
    """The node specs for validation, re-read at most once a second (INPUT_TYPES lists model files;
    ComfyUI also caches those listings briefly), so a burst of prompts does not re-read them each."""
    now = time.monotonic()
    cached = st.spec_table
    if cached is None or now - cached[0] > SPEC_TABLE_SECONDS:
        cached = (now, SpecTable(st.registry))
        st.spec_table = cached
    return cached[1]


_DEMO_SEEN: set[tuple[str, frozenset[str]]] = set()   # (base folder, names) already handled


async def ensure_demo(st: ServerState, prompt: dict[str, Any]) -> None:
    """Create demo model files the prompt names (off the loop; remembered per set of names)."""
    names = (str(st.folders.base_dir),
             frozenset(v for node in prompt.values() for v in (node.get("inputs") or {}).values() if isinstance(v, str)))
    if names in _DEMO_SEEN:
        return
    from nodes.environment import ensure_demo_files
    try:
        await asyncio.to_thread(ensure_demo_files, prompt, st.folders)
    except Exception:
        log.exception("creating demo files failed")
        return
    if len(_DEMO_SEEN) > 10_000:
        _DEMO_SEEN.clear()
    _DEMO_SEEN.add(names)


# -- /queue, /interrupt, /free ----------------------------------------------------------------------
@routes.get("/queue")
async def get_queue(request: web.Request) -> web.Response:
    queue = state(request).queue
    running, pending = queue.snapshot()
    # a Ray worker pool runs several jobs at once
    all_running = queue.running_jobs() if hasattr(queue, "running_jobs") else ([running] if running else [])
    return web.json_response({"queue_running": [job.queue_item() for job in all_running],
                              "queue_pending": [job.queue_item() for job in pending]})


def remove_pending(st: ServerState, prompt_ids: list[str] | None) -> list[Job]:
    removed = st.queue.clear() if prompt_ids is None else st.queue.remove(prompt_ids)
    if removed:
        st.store.delete_jobs([job.prompt_id for job in removed])
        st.hub.send_status()
    return removed


@routes.post("/queue")
async def post_queue(request: web.Request) -> web.Response:
    st = state(request)
    body = await read_json(request, dict)
    delete = body.get("delete")
    if delete is not None and (not isinstance(delete, list) or not all(isinstance(x, str) for x in delete)):
        return json_error(400, "'delete' must be a list of prompt ids")
    if body.get("clear"):
        remove_pending(st, None)
    if delete:
        remove_pending(st, delete)
    return web.Response(status=200)


@routes.post("/interrupt")
async def post_interrupt(request: web.Request) -> web.Response:
    st = state(request)
    body = await read_json(request, dict, empty={})
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and not isinstance(prompt_id, str):
        return json_error(400, "'prompt_id' must be a string")
    st.worker.interrupt(prompt_id)
    return web.Response(status=200)


@routes.post("/free")
async def post_free(request: web.Request) -> web.Response:
    body = await read_json(request, dict, empty={})
    state(request).worker.request_free(bool(body.get("unload_models")), bool(body.get("free_memory")))
    return web.Response(status=200)


# -- /history -------------------------------------------------------------------------------------
def _int_query(request: web.Request, name: str, minimum: int = 0) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f'{{"error": "{name} must be an integer, got {raw!r}"}}',
                                 content_type="application/json") from None
    if value < minimum:
        raise web.HTTPBadRequest(text=f'{{"error": "{name} must be at least {minimum}"}}', content_type="application/json")
    return value


@routes.get("/history")
async def get_history(request: web.Request) -> web.Response:
    items = state(request).history.items(_int_query(request, "max_items"), _int_query(request, "offset") or 0)
    return web.json_response(dict(items))


@routes.get("/history/{prompt_id}")
async def get_history_item(request: web.Request) -> web.Response:
    prompt_id = request.match_info["prompt_id"]
    entry = state(request).history.get(prompt_id)
    return web.json_response({prompt_id: entry} if entry is not None else {})


@routes.post("/history")
async def post_history(request: web.Request) -> web.Response:
    st = state(request)
    body = await read_json(request, dict)
    delete = body.get("delete")
    if delete is not None and (not isinstance(delete, list) or not all(isinstance(x, str) for x in delete)):
        return json_error(400, "'delete' must be a list of prompt ids")
    if body.get("clear"):
        st.history.clear()
        st.store.delete_history(None)
    if delete:
        st.history.delete(delete)
        st.store.delete_history(delete)
    return web.Response(status=200)


# -- the jobs API (what the 1.58 frontend's queue and history panels read) -------------------------
def _messages(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: data for name, data in entry.get("status", {}).get("messages", [])}


def _preview_output(outputs: dict[str, Any]) -> tuple[int, int, dict[str, Any] | None]:
    count = previewable = 0
    best: tuple[int, dict[str, Any]] | None = None
    for node_id, ui in (outputs or {}).items():
        for key, items in (ui or {}).items():
            if not isinstance(items, list):
                continue
            for item in items:
                count += 1
                if key in PREVIEWABLE and isinstance(item, dict) and "filename" in item:
                    previewable += 1
                    rank = 0 if item.get("type") == "output" else 1
                    if best is None or rank < best[0]:
                        best = (rank, {**item, "nodeId": node_id, "mediaType": key})
    return count, previewable, best[1] if best else None


def job_summary(job: Job | None = None, status: str = "pending", entry: dict[str, Any] | None = None,
                prompt_id: str | None = None) -> dict[str, Any]:
    """One job of `/api/jobs` (keys with null values left out, as ComfyUI does)."""
    if entry is not None:
        number, pid, _prompt, extra, _outs = entry["prompt"][:5]
        msgs = _messages(entry)
        start = msgs.get("execution_start", {}).get("timestamp")
        end_msg = msgs.get("execution_success") or msgs.get("execution_error") or msgs.get("execution_interrupted") or {}
        if "execution_interrupted" in msgs:
            status = "cancelled"
        elif entry.get("status", {}).get("status_str") == "success":
            status = "completed"
        else:
            status = "failed"
        count, previewable, preview = _preview_output(entry.get("outputs", {}))
        out = {"id": pid, "status": status, "priority": number, "create_time": extra.get("create_time"),
               "execution_start_time": start, "execution_end_time": end_msg.get("timestamp"),
               "execution_error": msgs.get("execution_error"), "outputs_count": count,
               "previewable_outputs_count": previewable, "preview_output": preview}
    else:
        if job is None:
            raise ValueError("job_summary needs a job or a history entry")
        extra = job.extra_data
        out = {"id": job.prompt_id, "status": status, "priority": job.queue_item()[0], "create_time": job.create_time,
               "execution_start_time": job.start_time if status == "in_progress" else None,
               "outputs_count": 0, "previewable_outputs_count": 0}
    workflow = ((extra.get("extra_pnginfo") or {}).get("workflow") or {}) if isinstance(extra, dict) else {}
    out["workflow_id"] = workflow.get("id") if isinstance(workflow, dict) else None
    return {k: v for k, v in out.items() if v is not None}


def all_jobs(st: ServerState) -> list[tuple[dict[str, Any], Job | None, dict[str, Any] | None]]:
    running, pending = st.queue.snapshot()
    out: list[tuple[dict[str, Any], Job | None, dict[str, Any] | None]] = []
    if running is not None:
        out.append((job_summary(running, "in_progress"), running, None))
    out.extend((job_summary(job, "pending"), job, None) for job in pending)
    out.extend((job_summary(entry=entry), None, entry) for _, entry in st.history.items())
    return out


@jobs_routes.get("/api/jobs")
async def get_jobs(request: web.Request) -> web.Response:
    st = state(request)
    q = request.query
    wanted = [s.strip() for s in q.get("status", "").split(",") if s.strip()]
    bad = [s for s in wanted if s not in JOB_STATUSES]
    if bad:
        return json_error(400, f"unknown status {', '.join(bad)}; use {', '.join(JOB_STATUSES)}")
    sort_by = q.get("sort_by", "created_at")
    if sort_by not in ("created_at", "execution_duration"):
        return json_error(400, "sort_by must be created_at or execution_duration")
    order = q.get("sort_order", "desc")
    if order not in ("asc", "desc"):
        return json_error(400, "sort_order must be asc or desc")
    try:
        limit = _int_query(request, "limit", minimum=1)
        offset = _int_query(request, "offset") or 0
    except web.HTTPBadRequest as exc:
        return web.Response(status=400, text=exc.text, content_type="application/json")
    workflow_id = q.get("workflow_id")
    jobs = [summary for summary, _, _ in all_jobs(st)
            if (not wanted or summary["status"] in wanted)
            and (workflow_id is None or summary.get("workflow_id") == workflow_id)]
    if sort_by == "created_at":
        jobs.sort(key=lambda j: j.get("create_time") or 0, reverse=order == "desc")
    else:
        jobs.sort(key=lambda j: (j.get("execution_end_time") or 0) - (j.get("execution_start_time") or 0),
                  reverse=order == "desc")
    total = len(jobs)
    page = jobs[offset: offset + limit if limit else None]
    return web.json_response({"jobs": page, "pagination": {
        "offset": offset, "limit": limit if limit is not None else total, "total": total,
        "has_more": offset + len(page) < total}})


@jobs_routes.get("/api/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    st = state(request)
    job_id = request.match_info["job_id"]
    entry = st.history.get(job_id)
    if entry is not None:
        out = job_summary(entry=entry)
        out["outputs"] = entry.get("outputs", {})
        out["execution_status"] = entry.get("status")
        out["workflow"] = {"prompt": entry["prompt"][2], "extra_data": entry["prompt"][3]}
        return web.json_response(out)
    job = st.queue.get(job_id)
    if job is None:
        return json_error(404, "Job not found")
    running = st.queue.running
    out = job_summary(job, "in_progress" if running is job else "pending")
    out["outputs"] = {}
    out["workflow"] = {"prompt": job.prompt, "extra_data": job.extra_data}
    return web.json_response(out)


def cancel(st: ServerState, job_id: str) -> bool:
    running = st.queue.running
    if running is not None and running.prompt_id == job_id:
        return bool(st.worker.interrupt(job_id))
    return bool(remove_pending(st, [job_id]))


@jobs_routes.post("/api/jobs/{job_id}/cancel")
async def post_cancel_job(request: web.Request) -> web.Response:
    return web.json_response({"cancelled": cancel(state(request), request.match_info["job_id"])})


@jobs_routes.post("/api/jobs/cancel")
async def post_cancel_jobs(request: web.Request) -> web.Response:
    try:
        body = await read_json(request, dict)
    except web.HTTPBadRequest:
        return json_error(400, "Request body must be valid JSON")
    ids = body.get("job_ids")
    if not isinstance(ids, list):
        return json_error(400, "job_ids must be a list")
    invalid = [i for i in ids if not is_canonical_uuid(i)]
    if invalid:
        return json_error(400, "job_ids contains invalid id(s)", invalid_ids=invalid)
    st = state(request)
    results = [cancel(st, job_id) for job_id in ids]
    return web.json_response({"cancelled": any(results)})
