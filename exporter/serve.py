"""`utrexport serve` as a library call: `run(bundles, ServeOptions(...))` serves bundles until SIGTERM, SIGINT or SIGHUP.

The run: a Triton repository in a temporary folder (utrexport.triton), a locked tritonserver on loopback
(utrexport.tritonserver), and in this process the front (utrexport.front) on `host`, the only port that faces the
network. Triton's own gRPC and metrics ports join `host` only when asked (`expose_triton`) and only for a
tritonserver that postdates NVIDIA's fixes of release 25.07.

Health tells the truth: readiness turns true once every model has loaded and answered its warm-up request, and
false when a model process dies; the run then ends with an error (status 1) so that a supervisor (systemd,
Kubernetes) restarts it: tritonserver 2.51 never restarts a dead Python-backend process, and keeps answering ready.
On a signal the front refuses new requests (503), lets those in flight finish (up to `drain_timeout` seconds),
then stops Triton and removes the repository; nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import utr_runtime

from . import interrupts, tritonserver
from .front import Front, FrontOptions, ServedModel
from .triton import RepositoryOptions, ServeError, model_names, write_repository

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WATCH_INTERVAL = 0.5  # seconds between looks at Triton's processes: a dead model turns readiness false within this


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000  # the front
    grpc_port: int = 8001  # Triton's gRPC
    metrics_port: int = 8002  # Triton's metrics
    api_key: str | None = field(default=None, repr=False)
    no_api_key: bool = False  # serve a non-loopback host without a key (behind a gateway that checks one)
    expose_triton: bool = False  # Triton's gRPC and metrics on `host` too (a tritonserver of release 25.07 or later only)
    max_body_bytes: int = 16 * 2**20
    max_waiting: int = 256
    drain_timeout: float = 30.0
    ready_timeout: float = 600.0
    tritonserver: str | None = None
    server_env: str | None = None
    triton_log: str | None = None  # Triton's log file; "-": this terminal; None: a file in the system's temporary folder
    repository: RepositoryOptions = field(default_factory=RepositoryOptions)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(bundles, options: ServeOptions, log=print) -> None:
    """Serve until a signal (returns) or a failure (ServeError). `log` gets every line meant for the operator."""
    if not is_loopback(options.host) and not options.api_key and not options.no_api_key:
        raise ServeError(f"serving on {options.host} (beyond this machine) needs an API key: --api-key-file FILE or $UTREXPORT_API_KEY "
                         "(or --no-api-key behind a gateway that checks one)")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # until the event loop takes them: unwind (remove the repository) as Ctrl-C does
        signal.signal(sig, interrupts.terminated)
    triton_host = options.host if options.expose_triton else "127.0.0.1"
    tritonserver.check_free(options.host, options.http_port, "--http-port")
    tritonserver.check_free(triton_host, options.grpc_port, "--grpc-port")
    tritonserver.check_free(triton_host, options.metrics_port, "--metrics-port")
    scratch = Path(tempfile.mkdtemp(prefix="utrexport-serve-"))
    try:
        write_repository(bundles, scratch / "models", options.repository)
        models = _served_models(bundles, options.repository)
        server = tritonserver.find_server(options.tritonserver, options.server_env, log)
        if options.expose_triton:
            _check_fixed(server, scratch, log)
        _event_loop_run(_serve(server, scratch, models, options, triton_host, log))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _event_loop_run(work) -> None:
    """uvloop where it is installed (the front's CPU per request is a share of the model's on a small machine)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(work)
    return uvloop.run(work)


def _served_models(bundles, repository: RepositoryOptions) -> list[ServedModel]:
    loaded = [utr_runtime.Bundle(b) for b in ([bundles] if isinstance(bundles, (str, Path)) else bundles)]
    return [ServedModel(name, capability, bundle.k, int(bundle.manifest["model"]["config"]["hidden_size"]), bundle.task)
            for bundle, names in zip(loaded, model_names(loaded, repository)) for capability, name in names.items()]


def _check_fixed(server: tritonserver.Server, scratch: Path, log) -> None:
    """Refuse to expose a tritonserver older than release 25.07: its version read from a start on an empty repository."""
    empty = scratch / "version-check"
    empty.mkdir()
    ports, locks = tritonserver.Ports.free(), tritonserver.Locks()
    ports.http = None
    with open(scratch / "version-check.log", "wb") as out:
        process = tritonserver.start(server, empty, ports, locks, log_file=out)
    try:
        version = tritonserver.wait_ready(process, f"127.0.0.1:{ports.grpc}", locks, timeout=120)
    finally:
        tritonserver.stop(process)
    if not tritonserver.is_fixed(version):
        raise ServeError(f"--expose-triton refused: tritonserver {version} predates release {tritonserver.FIXED_RELEASE} "
                         f"({'.'.join(map(str, tritonserver.FIXED_VERSION))}), which fixed {tritonserver.CVES}; run NVIDIA's current "
                         "container's tritonserver (--tritonserver), or serve through the front alone")


async def _serve(server, scratch: Path, models: list[ServedModel], options: ServeOptions, triton_host: str, log) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    locks = tritonserver.Locks(api_key=options.api_key if options.expose_triton else None)
    log_path = None if options.triton_log == "-" else Path(options.triton_log or Path(tempfile.gettempdir()) / f"utrexport-tritonserver-{options.http_port}.log")
    names = ", ".join(m.name for m in models)
    log(f"starting {server.binary} on models {names} ({options.repository.precision}, engine {options.repository.engine}, "
        f"device {options.repository.device}); its log: {log_path or 'this terminal'}")
    ports = tritonserver.Ports(None, options.grpc_port, options.metrics_port)
    with open(log_path, "wb") if log_path else contextlib.nullcontext() as out:
        process = tritonserver.start(server, scratch / "models", ports, locks, triton_host, out)
    try:
        grpc = f"127.0.0.1:{options.grpc_port}" if triton_host in ("0.0.0.0", "::") or is_loopback(triton_host) else f"{triton_host}:{options.grpc_port}"
        version = await _until(stop, asyncio.to_thread(tritonserver.wait_ready, process, grpc, locks, options.ready_timeout, log_path))
        if version is None:
            log("stopped before the models were ready")
            return
        if not is_loopback(options.host) and not tritonserver.is_fixed(version):
            log(f"tritonserver {version} predates release {tritonserver.FIXED_RELEASE} ({tritonserver.CVES} fixed there): its ports stay on "
                f"127.0.0.1, only the front listens on {options.host}")
        front = Front(models, FrontOptions(grpc, options.repository.limits_served(), options.api_key, locks.grpc_headers(),
                                           options.max_body_bytes, options.max_waiting), log)
        await _front(front, process, options, log, stop)
    finally:
        await asyncio.to_thread(tritonserver.stop, process)
    log("stopped")


async def _until(stop: asyncio.Event, work):
    """The result of `work`, or None if `stop` is set first."""
    work, stopped = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if work.done():
        return work.result()
    work.cancel()
    return None


async def _front(front: Front, process, options: ServeOptions, log, stop: asyncio.Event) -> None:
    """The front on host:http_port until `stop`, watching Triton's processes; then the drain."""
    import uvicorn

    class Server(uvicorn.Server):  # the signals are this run's (the drain), not uvicorn's
        def install_signal_handlers(self) -> None:
            pass

        def capture_signals(self):
            return contextlib.nullcontext()

    listening = tritonserver.bind(options.host, options.http_port, "--http-port")
    listening.listen(1024)
    # limit_concurrency: past it uvicorn answers 503 without reading the request, which bounds the connections that
    # clients may hold open (requests inside the front are bounded by max_waiting, with 429).
    config = uvicorn.Config(front, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=5,
                            timeout_graceful_shutdown=options.drain_timeout, limit_concurrency=options.max_waiting + 1024)
    http = Server(config)
    serving = asyncio.ensure_future(http.serve(sockets=[listening]))
    failure: list[str] = []
    watcher = asyncio.ensure_future(_watch(front, process, failure, stop))
    while not http.started and not serving.done():
        await asyncio.sleep(0.02)
    front.ready = True
    shown = f"[{options.host}]" if ":" in options.host else options.host
    http_url = f"http://{shown}:{options.http_port}"
    embed = next((m.name for m in front.models.values() if m.capability == "embed"), None)
    log(f"serving {', '.join(front.models)}: {http_url}/v1/embeddings (OpenAI, model {embed}), {http_url}/v2/models/{embed}/infer (KServe v2); "
        f"Triton gRPC {'127.0.0.1' if not options.expose_triton else shown}:{options.grpc_port}, metrics "
        f"http://{'127.0.0.1' if not options.expose_triton else shown}:{options.metrics_port}/metrics; Ctrl-C stops")
    await stop.wait()
    watcher.cancel()
    if not failure:
        log("stopping: no new requests, waiting for those in flight")
        left = await front.drain(options.drain_timeout)
        if left:
            log(f"{left} requests still running after --drain-timeout {options.drain_timeout:g} s: they are cancelled")
    front.ready = False
    http.should_exit = True
    await serving
    await front.close()
    if failure:
        raise ServeError(failure[0])


async def _watch(front: Front, process, failure: list[str], stop: asyncio.Event) -> None:
    """Readiness false, and the run ended with an error, as soon as tritonserver or one of its model processes dies."""
    stubs = tritonserver.stub_processes(process)
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        if process.poll() is not None:
            problem = f"tritonserver exited with status {process.returncode}"
        else:
            dead = [(pid, name) for pid, name in stubs.items() if not _alive(pid)]
            problem = dead and (f"model {dead[0][1]}'s process (pid {dead[0][0]}) died (the kernel's OOM killer ends processes so); "
                                "stopping with status 1 so that a supervisor restarts the server")
        if problem:
            front.ready = False
            failure.append(problem)
            stop.set()
            return


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
