"""Workers as Ray actors: `easel serve --ray auto|ADDRESS [--workers N]`.

Each actor (`EaselActor`) holds its own node registry, `Executor` and `OutputCache`, and runs one
prompt at a time in a thread of its own, so that `poll`, `interrupt` and `ping` calls are answered
while it samples (a threaded actor, max_concurrency 4). The server side (`RayBackend`, one per
actor, implementing backends.Backend) starts a prompt and long-polls its events: `poll(cursor,
wait)` returns the events after `cursor` as soon as there are any (or after `wait` seconds), and
the result once the run ended. Every poll is also the heartbeat: an actor that does not answer one
within `heartbeat` seconds (a frozen process, a hung driver call holding the GIL) is killed and
reported as `WorkerLost`, like one that died (`RayActorError`).

Output files: an actor writes to folders of its own and attaches the bytes of each file an
`executed` event names (then deletes its copy); the server writes them into its output/temp
folders before the event goes on, so `/view` serves a file as soon as a client hears of it. A name
that is taken gets the next free counter (`ComfyUI_00007_.png`), and the event and the history
entry carry the new name: two workers never overwrite each other's pictures. With a shared folder
(`shared_output`, EASEL_RAY_SHARED_OUTPUT=1 for `easel serve`: a path every worker machine
mounts at the server's output path) the actors write there directly and nothing travels; their
SaveImage counters may then race, so give concurrent prompts distinct filename prefixes.
"""
from __future__ import annotations

import importlib
import logging
import os
import pickle
import re
import socket
import tempfile
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from graph import events as ev
from graph.executor import RunResult
from nodes.folders import ModelFolders, use_folders

from .backends import Backend, InProcessBackend, RunRequest, WorkerLost

log = logging.getLogger("easel.server")

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT = 30.0          # seconds an actor may take to answer a poll before it counts as hung
POLL_WAIT = 0.5           # seconds a poll waits in the actor for new events
START_TIMEOUT = 180.0     # seconds a new actor may take to build its registry
PLAIN_EVENTS = frozenset({ev.EXECUTION_START, ev.EXECUTION_CACHED, ev.EXECUTING, ev.PROGRESS, ev.EXECUTED,
                          ev.EXECUTION_ERROR, ev.EXECUTION_INTERRUPTED, ev.EXECUTION_SUCCESS})
FILE_KEYS = ("images", "gifs", "audio", "video", "3d")


@dataclass(frozen=True)
class WorkerConfig:
    """How an actor builds its executor (all plain values: it travels to other machines)."""
    base_dir: str
    output_dir: str | None = None          # shared output folder; None: the actor's own, files copied back
    temp_dir: str | None = None            # shared temp folder (with output_dir)
    extra_model_paths: tuple[str, ...] = ()
    registry: str = "nodes.registry:build_registry"   # "module:function" returning a Registry
    plugin_dirs: tuple[str, ...] = ()
    demo_files: bool = True
    cpu: bool = False
    lowvram: bool = False
    threads: int | None = None             # OMP/MKL threads of the actor's process (CPU workers)
    env: dict[str, str] = field(default_factory=dict)


def _load_registry(config: WorkerConfig) -> Any:
    module_name, _, func_name = config.registry.partition(":")
    factory = getattr(importlib.import_module(module_name), func_name or "build_registry")
    if config.registry.startswith("nodes.registry:"):
        return factory(plugin_dirs=[Path(p) for p in config.plugin_dirs])
    return factory()


def _picklable(data: dict[str, Any]) -> dict[str, Any]:
    try:
        pickle.dumps(data)
        return data
    except Exception:  # noqa: BLE001 - anything a plugin put in an event; it travels as its repr
        return {key: (value if _can_pickle(value) else repr(value)) for key, value in data.items()}


def _can_pickle(value: Any) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001 - pickling may raise anything
        return False


class EaselActor:
    """One worker process: registry, executor, cache; one prompt at a time."""

    def __init__(self, config: WorkerConfig, name: str) -> None:
        for key, value in config.env.items():
            os.environ[key] = value
        if config.threads:
            for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[key] = str(config.threads)
        from graph.cache import OutputCache
        from graph.executor import Executor
        from nodes.environment import configure_devices
        configure_devices(cpu=config.cpu, lowvram=config.lowvram)
        self.config, self.name = config, name
        self.copy_files = config.output_dir is None
        own = Path(tempfile.mkdtemp(prefix=f"easel-{name}-")) if self.copy_files else None
        self.folders = ModelFolders(config.base_dir, output_dir=config.output_dir or (own / "output" if own else None))
        self.folders.temp_dir = Path(config.temp_dir) if config.temp_dir else (own / "temp" if own else self.folders.temp_dir)
        if config.extra_model_paths:
            from nodes.extra_paths import apply_extra_paths
            apply_extra_paths(self.folders, *[Path(p) for p in config.extra_model_paths])
        for folder in (self.folders.output_dir, self.folders.temp_dir):
            Path(folder).mkdir(parents=True, exist_ok=True)
        self.registry = _load_registry(config)
        self.backend = InProcessBackend(Executor(self.registry, OutputCache(), None, folders=self.folders))
        self._cond = threading.Condition()
        self._events: list[tuple[str, dict[str, Any], list[tuple[str, str, str, bytes]]]] = []
        self._done: tuple[str, Any, frozenset[str]] | None = None
        self._thread: threading.Thread | None = None
        self.runs = 0

    def ping(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "gpus": [str(g) for g in ray.get_gpu_ids()], "runs": self.runs}

    def start(self, request: RunRequest) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError(f"worker {self.name} is already running a prompt")
            self._events, self._done = [], None
            self._thread = threading.Thread(target=self._run, args=(request,), name="easel-actor-run", daemon=True)
            self._thread.start()

    def _run(self, request: RunRequest) -> None:
        done: tuple[str, Any, frozenset[str]]
        with use_folders(self.folders):
            try:
                if self.config.demo_files:
                    from nodes.environment import ensure_demo_files
                    ensure_demo_files(request.prompt, self.folders)
                result = self.backend.run(request, self._sink)
                if result.validation is not None and result.status != "invalid":
                    result.validation = None             # the report stays here; the server does not read it
                done = ("result", result, self.backend.models())
            except BaseException as exc:                 # noqa: BLE001 - reported to the server
                done = ("raised", (type(exc).__name__, str(exc), traceback.format_exception(exc)),
                        self.backend.models())
        self.runs += 1
        with self._cond:
            self._done = done
            self._cond.notify_all()

    def _sink(self, event: str, data: dict[str, Any]) -> None:
        files: list[tuple[str, str, str, bytes]] = []
        if event == ev.EXECUTED and self.copy_files:
            files = self._files_of(data.get("output"))
        if event not in PLAIN_EVENTS:
            data = _picklable(data)
        with self._cond:
            self._events.append((event, data, files))
            self._cond.notify_all()

    def _files_of(self, ui: Any) -> list[tuple[str, str, str, bytes]]:
        """(type, subfolder, filename, bytes) of the files an output node reported."""
        out = []
        roots = {"output": self.folders.output_dir, "temp": self.folders.temp_dir}
        for item in _file_items(ui):
            root = roots.get(str(item.get("type", "output")))
            if root is None:
                continue
            path = Path(root) / str(item.get("subfolder") or "") / str(item["filename"])
            try:
                out.append((str(item.get("type", "output")), str(item.get("subfolder") or ""),
                              str(item["filename"]), path.read_bytes()))
                path.unlink()                        # the server keeps the file; this disk does not grow
            except OSError:
                log.warning("worker %s: output file %s could not be read", self.name, path)
        return out

    def poll(self, cursor: int, wait: float) -> tuple[list[Any], tuple[str, Any, frozenset[str]] | None]:
        """Events after `cursor` (waiting up to `wait` s for one) and the end of the run when it came."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._events) > cursor or self._done is not None, wait)
            return self._events[cursor:], self._done

    def interrupt(self) -> None:
        self.backend.interrupt()

    def models(self) -> frozenset[str]:
        return self.backend.models()

    def free(self, unload_models: bool, free_memory: bool) -> frozenset[str]:
        self.backend.free(unload_models, free_memory)
        return self.backend.models()


def _file_items(ui: Any) -> list[dict[str, Any]]:
    if not isinstance(ui, Mapping):
        return []
    return [item for key in FILE_KEYS for item in (ui.get(key) or [])
            if isinstance(item, dict) and isinstance(item.get("filename"), str)]


def place_file(folders: ModelFolders, kind: str, subfolder: str, filename: str, data: bytes) -> str:
    """Write a file an actor made into the server's folder of `kind`; the name it got."""
    root = Path(folders.output_dir if kind == "output" else folders.temp_dir).resolve()
    target_dir = (root / subfolder).resolve()
    if target_dir != root and root not in target_dir.parents:
        raise ValueError(f"output file {subfolder}/{filename}: subfolder leaves the {kind} folder")
    target_dir.mkdir(parents=True, exist_ok=True)
    name = filename
    for _ in range(10_000):
        try:
            with open(target_dir / name, "xb") as handle:     # never overwrite another worker's file
                handle.write(data)
            return name
        except FileExistsError:
            name = _next_name(target_dir, filename)
    raise FileExistsError(f"no free name for {filename} in {target_dir}")


_COUNTED = re.compile(r"^(?P<base>.*)_(?P<n>\d{5,})_(?P<ext>\.[^.]+)$")   # SaveImage: <base>_<00001>_.png


def _next_name(folder: Path, filename: str) -> str:
    """A free name for `filename` in `folder`: the next SaveImage counter, else `<stem>_<n><ext>`."""
    match = _COUNTED.match(filename)
    if match:
        base, ext = match["base"], match["ext"]
        highest = 0
        for existing in os.listdir(folder):
            other = _COUNTED.match(existing)
            if other and other["base"] == base:
                highest = max(highest, int(other["n"]))
        return f"{base}_{highest + 1:05}_{ext}"
    stem, dot, ext = filename.rpartition(".")
    stem, ext = (stem, dot + ext) if dot else (filename, "")
    n = 1
    while (folder / f"{stem}_{n}{ext}").exists():
        n += 1
    return f"{stem}_{n}{ext}"


def rename_ui(ui: Any, renames: Mapping[tuple[str, str, str], str]) -> Any:
    """A copy of an output node's ui with files that got another name on the server renamed."""
    if not renames or not isinstance(ui, Mapping):
        return ui
    out = dict(ui)
    for key in FILE_KEYS:
        items = ui.get(key)
        if not isinstance(items, list):
            continue
        out[key] = [dict(item, filename=renames.get((str(item.get("type", "output")), str(item.get("subfolder") or ""),
                                                     str(item.get("filename"))), item.get("filename")))
                    if isinstance(item, dict) else item for item in items]
    return out


class RemoteError(Exception):
    """The actor's executor raised (not a node: the run itself)."""


class RayBackend:
    """The server side of one actor (backends.Backend)."""

    def __init__(self, actor: Any, name: str, folders: ModelFolders, copy_files: bool,
                 heartbeat: float = HEARTBEAT, poll_wait: float = POLL_WAIT) -> None:
        self.actor, self.name, self.folders, self.copy_files = actor, name, folders, copy_files
        self.heartbeat, self.poll_wait = heartbeat, poll_wait
        self._held: frozenset[str] = frozenset()
        self.info: dict[str, Any] = {}

    def _call(self, ref: Any, what: str, timeout: float) -> Any:
        try:
            return ray.get(ref, timeout=timeout)
        except GetTimeoutError:
            self._kill()
            raise WorkerLost(f"no answer to {what} within {timeout:g} s (hung); the worker was stopped") from None
        except RayActorError as exc:
            raise WorkerLost(f"the worker process died ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
        except RayTaskError:
            raise
        except RayError as exc:
            raise WorkerLost(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None

    def run(self, request: RunRequest, sink: ev.EventSink, report: Any = None, specs: Any = None) -> RunResult:
        self._call(self.actor.start.remote(request), "start", self.heartbeat)
        cursor = 0
        renames: dict[tuple[str, str, str], str] = {}
        done = None
        try:
            while done is None:
                events, done = self._call(self.actor.poll.remote(cursor, self.poll_wait), "a heartbeat poll",
                                          self.heartbeat + self.poll_wait)
                for event, data, files in events:
                    if files:
                        for kind, subfolder, filename, blob in files:
                            placed = place_file(self.folders, kind, subfolder, filename, blob)
                            if placed != filename:
                                renames[(kind, subfolder, filename)] = placed
                        data = dict(data, output=rename_ui(data.get("output"), renames))
                    sink(event, data)
                cursor += len(events)
        except WorkerLost:
            raise
        except Exception:
            self._abandon(cursor)           # e.g. a full disk here: stop the run so the actor is free again
            raise
        kind, value, held = done
        self._held = held
        if kind == "raised":
            name, message, tb = value
            raise RemoteError(f"{name}: {message} (in worker {self.name})\n{''.join(tb[-3:])}")
        result: RunResult = value
        if renames:
            result = replace(result, outputs={nid: rename_ui(ui, renames) for nid, ui in result.outputs.items()})
        return result

    def _abandon(self, cursor: int) -> None:
        """Interrupt the actor's run and wait (one heartbeat at most) until it ended."""
        self.interrupt()
        try:
            while True:
                events, done = self._call(self.actor.poll.remote(cursor, self.poll_wait), "a poll", self.heartbeat)
                cursor += len(events)
                if done is not None:
                    self._held = done[2]
                    return
        except WorkerLost:
            log.warning("worker %s was lost while its abandoned run was stopping", self.name)

    def interrupt(self) -> None:
        try:
            self.actor.interrupt.remote()
        except RayError:
            pass

    def models(self) -> frozenset[str]:
        return self._held

    def free(self, unload_models: bool, free_memory: bool) -> None:
        self._held = self._call(self.actor.free.remote(unload_models, free_memory), "free", self.heartbeat)

    def _kill(self) -> None:
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:
            log.debug("killing worker %s failed", self.name, exc_info=True)

    def close(self) -> None:
        self._kill()


# -- the cluster and the pool ---------------------------------------------------------------------

def connect(address: str = "auto", num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Join the Ray cluster at `address`, or with "auto" an existing one else a new local one
    (bound to 127.0.0.1, no dashboard). True when this call started a local cluster."""
    if ray.is_initialized():
        return False
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if address not in ("auto", "local"):
        ray.init(address=address, log_to_driver=False)
        return False
    if address == "auto" and (os.environ.get("RAY_ADDRESS") or _local_cluster_running()):
        try:
            ray.init(address="auto", log_to_driver=False)
            return False
        except ConnectionError:
            pass
    _loopback_only()
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus,
             log_to_driver=False, runtime_env={"env_vars": env})
    return True


def _loopback_only() -> None:
    """Make a local cluster bind 127.0.0.1 only. Ray takes its node address from the first
    interface unless clusters are off (its desktop mode, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0):
    then the node address is the loopback one and every gRPC server (GCS, raylet, workers)
    binds to it. The switch is read once at import, so the module constant is set too; child
    processes read the environment variable."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False


def _local_cluster_running() -> bool:
    return Path(tempfile.gettempdir(), "ray", "ray_current_cluster").is_file()


@dataclass(frozen=True)
class PoolPlan:
    count: int
    gpus_per_worker: float
    cpus_per_worker: float


def plan_pool(workers: int | None, cpus_per_worker: float = 1.0) -> PoolPlan:
    """One worker per GPU of the cluster, or `workers` CPU workers (one when there is no GPU)."""
    if workers is not None:
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        return PoolPlan(workers, 0.0, cpus_per_worker)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return PoolPlan(gpus, 1.0, cpus_per_worker) if gpus else PoolPlan(1, 0.0, cpus_per_worker)


class RayPool:
    """Starts actors for a plan and replaces lost ones (`make`, given to scheduler.PoolWorker)."""

    def __init__(self, config: WorkerConfig, plan: PoolPlan, folders: ModelFolders,
                 heartbeat: float = HEARTBEAT, poll_wait: float = POLL_WAIT) -> None:
        self.config, self.plan, self.folders = config, plan, folders
        self.heartbeat, self.poll_wait = heartbeat, poll_wait
        self.started = 0
        self._remote = ray.remote(EaselActor)

    def _spawn(self, index: int) -> RayBackend:
        self.started += 1
        name = f"w{index}.{self.started}"
        actor = self._remote.options(num_cpus=self.plan.cpus_per_worker, num_gpus=self.plan.gpus_per_worker,
                                     max_concurrency=4, max_restarts=0).remote(self.config, name)
        return RayBackend(actor, name, self.folders, self.config.output_dir is None, self.heartbeat, self.poll_wait)

    def _ready(self, backend: RayBackend) -> RayBackend:
        try:
            backend.info = ray.get(backend.actor.ping.remote(), timeout=START_TIMEOUT)
        except RayError as exc:
            backend.close()
            raise RuntimeError(f"worker {backend.name} did not start: {exc}") from exc
        log.info("worker %s ready (pid %s on %s, gpus %s)", backend.name, backend.info.get("pid"),
                 backend.info.get("host"), backend.info.get("gpus") or "none")
        return backend

    def start_all(self) -> list[Backend]:
        backends = [self._spawn(i) for i in range(self.plan.count)]
        return [self._ready(b) for b in backends]

    def make(self, index: int) -> Backend:
        return self._ready(self._spawn(index))


def worker_config(settings: Any, folders: ModelFolders, shared_output: bool, registry: str | None = None,
                  threads: int | None = None) -> WorkerConfig:
    """The actor configuration for a server's settings."""
    plugin_dir = Path(settings.base_dir) / "custom_nodes"
    return WorkerConfig(
        base_dir=str(settings.base_dir),
        output_dir=str(folders.output_dir) if shared_output else None,
        temp_dir=str(folders.temp_dir) if shared_output else None,
        extra_model_paths=tuple(str(p) for p in settings.extra_model_paths),
        registry=registry or "nodes.registry:build_registry",
        plugin_dirs=(str(plugin_dir),) if settings.plugins and plugin_dir.is_dir() else (),
        demo_files=settings.demo_files, cpu=settings.cpu, lowvram=settings.lowvram, threads=threads)


Factory = Callable[[int], Backend]
