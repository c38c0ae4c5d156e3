"""The aiohttp application: `create_app(settings)` wires the pieces, `serve(args)` runs it.

Pieces: `QueueStore` (SQLite under the base directory) restores the queue and history; a
`Worker` thread runs the `Executor`; the `Hub` owns the websockets; route tables from
routes_prompt / routes_files / routes_info (each route also under `/api`, protocol.md 1);
plugin routes from `PromptServer.instance.routes`; the web frontend last.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from graph.cache import OutputCache
from graph.executor import Executor
from nodes.folders import ModelFolders

from . import routes_files, routes_info, routes_prompt
from .backends import Backend
from .frontend import add_frontend, find_web_root
from .queue_store import MAX_RETRIES, AcceptBatcher, HistoryBook, JobQueue, QueueStore
from .security import errors_middleware, origin_middleware, token_middleware
from .settings import STATE, ServerState, Settings
from .websocket import Hub
from .worker import Worker, crashed_entry

log = logging.getLogger("easel.server")


def add_routes(app: web.Application, defs: Iterable[web.AbstractRouteDef], twin: bool = True,
               prefix: str = "") -> None:
    """Add route definitions, each also under `/api` when `twin` (ComfyUI's mechanical copy)."""
    for route in defs:
        if not isinstance(route, web.RouteDef):
            route.register(app.router)
            continue
        path = prefix + route.path
        kwargs = dict(route.kwargs)
        app.router.add_route(route.method, path, route.handler, **kwargs)
        if twin and not path.startswith("/api/"):
            app.router.add_route(route.method, "/api" + path, route.handler, **kwargs)


def server_flags(settings: Settings) -> dict[str, Any]:
    """The feature flags of `GET /features` and the websocket handshake (only what Easel does)."""
    return {"supports_preview_metadata": True, "max_upload_size": settings.max_upload_size,
            "extension": {"manager": {"supports_v4": True}}, **settings.feature_flags}


def default_registry(settings: Settings) -> Any:
    from nodes.registry import build_registry
    plugin_dir = settings.base_dir / "custom_nodes"
    dirs = [plugin_dir] if settings.plugins and plugin_dir.is_dir() else []
    return build_registry(plugin_dirs=dirs)


def make_folders(settings: Settings) -> ModelFolders:
    folders = ModelFolders(settings.base_dir)
    configs = list(settings.extra_model_paths)
    default_config = settings.base_dir / "extra_model_paths.yaml"
    if default_config.is_file():
        configs.append(default_config)
    if configs:
        from nodes.extra_paths import apply_extra_paths
        apply_extra_paths(folders, *configs)
    for folder in (folders.output_dir, folders.input_dir, folders.temp_dir):
        Path(folder).mkdir(parents=True, exist_ok=True)
    return folders


def _compat() -> Any:
    try:
        from .prompt_server_compat import PromptServer
    except ImportError:
        return None
    return PromptServer.instance


def restore(store: QueueStore, queue: JobQueue, history: HistoryBook) -> None:
    """Queue and history from the last run; a job the server died on twice becomes a failure."""
    jobs, entries = store.load()
    for prompt_id, entry in entries:
        history.add(prompt_id, entry)
        try:
            queue.bump_counter(float(entry["prompt"][0]))
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    crashed = store.read_marker()
    again = []
    for job in jobs:
        queue.bump_counter(job.number)
        if job.prompt_id == crashed:
            job.attempts += 1
            store.write([store.op_start(job)])
        if job.attempts > MAX_RETRIES:
            entry = crashed_entry(job, job.attempts)
            history.add(job.prompt_id, entry)
            store.write(store.op_finish(job.prompt_id, entry))
            log.warning("prompt %s stopped the server %d times; marked failed", job.prompt_id, job.attempts)
        else:
            if job.prompt_id == crashed:
                log.warning("prompt %s was running when the server stopped; running it again", job.prompt_id)
            again.append(job)
    store.mark_running(None)
    queue.put(again)


# a worker pool for the server's folders: (the backends, how to replace the one of a slot)
PoolFactory = Callable[[ModelFolders], tuple[Sequence[Backend], Callable[[int], Backend] | None]]


def create_app(settings: Settings, registry: Any = None, pool: PoolFactory | None = None,
               affinity_wait: float | None = None) -> web.Application:
    """The app; with `pool`, prompts run on its backends (server/scheduler.py) instead of in-process."""
    folders = make_folders(settings)
    registry = registry if registry is not None else default_registry(settings)
    store = QueueStore(settings.db_path, settings.max_history)
    if pool is not None:
        from .scheduler import PoolQueue
        queue: JobQueue = PoolQueue()
    else:
        queue = JobQueue()
    history = HistoryBook(settings.max_history)
    restore(store, queue, history)
    flags = server_flags(settings)
    hub = Hub(flags, lambda: {"exec_info": {"queue_remaining": queue.remaining()}})
    executor = Executor(registry, OutputCache(), None, folders=folders)
    compat = _compat()

    def prepare(job: Any) -> None:
        if settings.demo_files and job.report is None:    # restored jobs; POST did it for the rest
            from nodes.environment import ensure_demo_files
            ensure_demo_files(job.prompt, folders)

    st_box: list[ServerState] = []
    specs = lambda: routes_prompt.spec_table(st_box[0])
    if pool is not None:
        from .scheduler import AFFINITY_WAIT, PoolWorker
        backends, make_backend = pool(folders)
        worker: Worker = PoolWorker(executor, queue, history, store, hub, folders, settings.preview_method, prepare,
                                    compat, specs=specs, backends=backends, make_backend=make_backend,
                                    affinity_wait=AFFINITY_WAIT if affinity_wait is None else affinity_wait)
    else:
        worker = Worker(executor, queue, history, store, hub, folders, settings.preview_method, prepare, compat,
                        specs=specs)
    hub.on_connect = worker.connect_replay
    batcher = AcceptBatcher(store, queue, hub.send_status)
    web_root = find_web_root(settings.frontend_root) if settings.frontend else None
    st = ServerState(settings, registry, folders, executor, queue, history, store, batcher, hub, worker,
                     flags, compat, web_root)
    st_box.append(st)

    middlewares = [errors_middleware, origin_middleware(settings.loopback_only, settings.enable_cors_header)]
    if settings.token:
        middlewares.append(token_middleware(settings.token))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_upload_size)
    app[STATE] = st
    app.router.add_get("/ws", hub.handle)
    add_routes(app, routes_prompt.routes)
    add_routes(app, routes_prompt.jobs_routes, twin=False)
    add_routes(app, routes_files.routes)
    add_routes(app, routes_info.routes)
    add_routes(app, routes_info.internal_routes, twin=False, prefix="/internal")
    app.router.add_get("/templates/{name}", _templates)
    if compat is not None:
        try:
            add_routes(app, compat.take_routes())
        except Exception:
            log.exception("adding plugin routes failed")
    add_frontend(app, web_root, dict(getattr(registry, "web_dirs", {}) or {}))

    async def on_startup(app: web.Application) -> None:
        hub.loop = asyncio.get_running_loop()
        if compat is not None:
            compat.attach(lambda event, data, sid=None: hub.post_threadsafe((event, data, sid)), app)
        worker.start()

    async def on_shutdown(app: web.Application) -> None:
        await asyncio.to_thread(worker.stop)
        await hub.close_all()

    async def on_cleanup(app: web.Application) -> None:
        if compat is not None:
            compat.detach()
        batcher.close()
        store.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


async def _templates(request: web.Request) -> web.Response:
    """No workflow-template package is served: the index files are empty JSON, the rest 404."""
    name = request.match_info["name"]
    if name.startswith("index") and name.endswith(".json"):
        return web.json_response({} if name == "index_logo.json" else [])
    return web.json_response({"error": f"template {name} not found"}, status=404)


def serve(args: argparse.Namespace) -> int:
    """`easel serve`: bind (127.0.0.1 unless --listen) and run until interrupted."""
    settings = Settings.from_args(args)
    from nodes.environment import configure_devices
    configure_devices(cpu=settings.cpu, lowvram=settings.lowvram)
    ray_address = getattr(args, "ray", None)
    if getattr(args, "workers", None) and not ray_address:
        log.warning("--workers is read with --ray only; running in-process")
    pool = None
    if ray_address:
        pool = ray_pool(settings, ray_address, getattr(args, "workers", None))
    app = create_app(settings, pool=pool)
    if not settings.loopback_only:
        log.warning("listening on %s: other machines can reach this server%s", settings.host,
                    "" if settings.token else " (no --token set: anyone who can connect can queue prompts)")
    web.run_app(app, host=settings.host, port=settings.port, access_log=None,
                print=lambda _msg: log.info("Easel serving on http://%s:%d", settings.host, settings.port))
    if ray_address:
        import ray
        ray.shutdown()
    return 0


def ray_pool(settings: Settings, address: str, workers: int | None) -> PoolFactory:
    """`--ray ADDRESS|auto|local [--workers N]`: join or start the cluster; the pool factory for
    create_app. Workers send their output files back to the server's folders, unless
    EASEL_RAY_SHARED_OUTPUT=1 says every worker writes to the server's output path directly;
    EASEL_RAY_HEARTBEAT (seconds, default 30) is how long a worker may not answer before it counts
    as hung. With --cpu and no --workers: one CPU worker."""
    try:
        from . import ray_backend
    except ImportError as exc:
        raise SystemExit(f"--ray needs the ray package (pip install 'easel[ray]'): {exc}") from exc
    ray_backend.connect(address)
    shared = os.environ.get("EASEL_RAY_SHARED_OUTPUT", "") not in ("", "0")
    heartbeat = float(os.environ.get("EASEL_RAY_HEARTBEAT") or ray_backend.HEARTBEAT)
    plan = ray_backend.plan_pool(1 if workers is None and settings.cpu else workers)
    log.info("Ray: %d worker(s), %s GPU and %s CPU each", plan.count, plan.gpus_per_worker, plan.cpus_per_worker)

    def factory(folders: ModelFolders) -> tuple[Sequence[Backend], Callable[[int], Backend] | None]:
        threads = max(1, int(plan.cpus_per_worker)) if not plan.gpus_per_worker else None
        config = ray_backend.worker_config(settings, folders, shared_output=shared, threads=threads)
        ray_pool = ray_backend.RayPool(config, plan, folders, heartbeat=heartbeat)
        return ray_pool.start_all(), ray_pool.make
    return factory
