"""The `tritonserver` process that `utrexport serve` runs: where it comes from, how it starts locked, and how it stops.

`serve` runs the tritonserver given or on PATH (NVIDIA's Triton container), else the one in the server environment
it makes once (a virtual environment with nvidia-pytriton's tritonserver, numpy<2 and the engines: the Python
backend's stub crashes on BYTES inputs with numpy 2, so the server's Python is kept apart from this one).

Every start is locked (NVIDIA's "Secure Deployment Considerations"): the shared-memory, model-config,
model-repository, trace and logging APIs need a header whose value is random per run and holds a control character,
which no HTTP or gRPC client can send, so nobody opens them, `serve` included (the shared-memory API is how a client
makes Triton read and write another program's memory); and models are never loaded or unloaded after start
(`--model-control-mode=none`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from .triton import ServeError

# The server environment: the tritonserver that nvidia-pytriton ships (Python backend only) and the runtime's needs.
# numpy<2: the Python backend stub of tritonserver 2.51 crashes deserializing BYTES inputs with numpy 2.
SERVER_PACKAGES = ("nvidia-pytriton==0.7.0", "numpy==1.26.4", "onnxruntime==1.32.0", "openvino==2026.4.1")
SERVER_ENV_VARIABLE = "UTREXPORT_SERVER_ENV"
ENV_MARK = "utrexport-server-env"  # a folder holding this file is one `serve` made, and may be remade
# NVIDIA's release 25.07 fixed the unauthenticated network defects of CVE-2025-23310, -23311 (HTTP chunked-encoding
# stack overflow), -23319, -23320 and -23334 (Python backend shared-memory chain). NVIDIA's release notes number the
# server of release 25.06 2.59.0 and that of 25.07 2.59.1 (25.08: 2.60.0). Older servers keep their ports on loopback.
FIXED_VERSION = (2, 59, 1)
FIXED_RELEASE = "25.07"
CVES = "CVE-2025-23310, -23311, -23319, -23320, -23334"
ADMIN_APIS = "shared-memory,model-config,model-repository,trace,logging"
ADMIN_HEADER = "utrexport-admin"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # Triton's gRPC endpoint expects restricted headers under this prefix


@dataclass
class Server:
    """Where `tritonserver` is and the environment it runs in."""

    binary: Path
    backends: Path | None  # --backend-directory (None: the server's own)
    env: dict


@dataclass(frozen=True)
class Locks:
    """The restricted APIs of one run: the admin header's random value, and the API key that guards inference and
    metadata on Triton's own ports when they are exposed (gRPC clients send it as `triton-grpc-protocol-authorization:
    Bearer KEY`)."""

    # The command line shows it to local users (ps): the control character keeps it unsendable all the same.
    admin: str = field(default_factory=lambda: secrets.token_urlsafe(32) + "\x01", repr=False)
    api_key: str | None = field(default=None, repr=False)

    def arguments(self) -> list[str]:
        groups = [f"{ADMIN_APIS}:{ADMIN_HEADER}={self.admin}"]
        if self.api_key:
            groups.append(f"metadata,inference,statistics:authorization=Bearer {self.api_key}")
        return [f"--{flag}={group}" for group in groups for flag in ("http-restricted-api", "grpc-restricted-protocol")] + \
            ["--model-control-mode=none"]

    def grpc_headers(self) -> dict[str, str]:
        """The headers a gRPC client of Triton sends to pass the key (none without one)."""
        return {f"{GRPC_HEADER_PREFIX}authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def find_server(tritonserver: str | None, server_env: str | os.PathLike | None, log) -> Server:
    """The tritonserver given, or on PATH (NVIDIA's container: its own Python runs the models), or the one in the
    server environment (made on first use)."""
    if tritonserver and os.sep in tritonserver:  # a path, relative ones included: never searched on PATH
        given = os.path.abspath(tritonserver)
    else:
        given = shutil.which(tritonserver or "tritonserver")
        if tritonserver and not given:
            raise ServeError(f"{tritonserver}: no such tritonserver on PATH (give its path, e.g. ./{tritonserver})")
    if given:
        if not (os.path.isfile(given) and os.access(given, os.X_OK)):
            raise ServeError(f"{given}: not an executable tritonserver")
        return Server(Path(given), None, dict(os.environ))
    env = Path(server_env or os.environ.get(SERVER_ENV_VARIABLE) or Path.home() / ".cache" / "utrexport" / "triton-server")
    ready = env / "ready"
    if not ready.is_file() or ready.read_text().split() != list(SERVER_PACKAGES):  # none yet, or made for other versions
        make_server_env(env, log)
    return _server_in(env)


def make_server_env(env: Path, log) -> None:
    """A virtual environment of this Python with SERVER_PACKAGES, and tritonserver's Python backend set up in it. Only a
    folder that `serve` made (it holds ENV_MARK) or an empty one is (re)made: any other folder is the user's."""
    _check_shared_libpython()
    if env.is_symlink() or (env.exists() and not env.is_dir()):
        raise ServeError(f"{env}: not a folder; choose another --server-env")
    ours = (env / ENV_MARK).is_file() or (env / "ready").is_file() and (env / "ready").read_text().startswith("nvidia-pytriton")  # or made before the mark
    if env.is_dir() and any(env.iterdir()) and not ours:
        raise ServeError(f"{env} is a folder utrexport did not make, and not empty: choose another --server-env (its files are left as they are)")
    log(f"making the server environment in {env} (once: about 400 MB of packages from the package index)")
    if ours:
        shutil.rmtree(env)
    env.mkdir(parents=True, exist_ok=True)
    (env / ENV_MARK).write_text("made by `utrexport serve`: it may remove and remake this folder\n")
    python = env / "bin" / "python"
    for command in ([sys.executable, "-m", "venv", str(env)], [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *SERVER_PACKAGES]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ServeError(f"making the server environment failed at `{' '.join(command[-3:])}`: {last}")
    triton = _pytriton_dir(env) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    # Beside the backend, at the same depth as the stubs' folder, so its RPATH still finds nvidia_pytriton.libs.
    shutil.copy2(stub, triton / "backends" / "python" / "triton_python_backend_stub")
    (env / "ready").write_text(" ".join(SERVER_PACKAGES) + "\n")


def _server_in(env: Path) -> Server:
    triton = _pytriton_dir(env) / "tritonserver"
    libraries = [sysconfig.get_config_var("LIBDIR"), str(_pytriton_dir(env).parent / "nvidia_pytriton.libs"), os.environ.get("LD_LIBRARY_PATH", "")]
    environment = {**os.environ,
                   # The Python backend's stub embeds libpython: the running interpreter's, not the system's (another build of
                   # CPython fails to load models), and finds the environment's packages by the python3 first on PATH.
                   "LD_LIBRARY_PATH": os.pathsep.join(p for p in libraries if p),
                   "PATH": f"{env / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    environment.pop("PYTHONHOME", None)
    environment.pop("PYTHONPATH", None)
    return Server(triton / "bin" / "tritonserver", triton / "backends", environment)


def _pytriton_dir(env: Path) -> Path:
    found = sorted(env.glob("lib/python*/site-packages/pytriton"))
    if not found:
        raise ServeError(f"{env} holds no nvidia-pytriton: remove the folder and run serve again to remake it")
    return found[0]


def _check_shared_libpython() -> None:
    library = Path(sysconfig.get_config_var("LIBDIR") or "") / (sysconfig.get_config_var("INSTSONAME") or "")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not library.is_file():
        raise ServeError("tritonserver's Python backend needs a Python built with a shared libpython (--enable-shared), which "
                         f"{sys.executable} lacks; run serve from such a Python (e.g. the system's python3 with its -dev package)")


@dataclass
class Ports:
    """Triton's ports: gRPC and metrics always, HTTP only where asked (`serve` answers HTTP with its front)."""

    http: int | None = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls, count: int = 3) -> "Ports":
        """Ports free on this machine now (tests and benchmarks: each server on its own); the first is HTTP's."""
        sockets = [socket.socket() for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in sockets]
        for s in sockets:
            s.close()
        return cls(*ports)


def bind(host: str, port: int, flag: str) -> socket.socket:
    """A socket bound to `port` on `host`, or a one-line error if it is taken (another server), naming the flag that
    chooses another."""
    bare = host.strip("[]")
    s = socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: a port only in TIME_WAIT is free
    try:
        s.bind((bare, port))
    except OSError as e:
        s.close()
        reason = "in use (another server?)" if e.errno == 98 else e.strerror
        raise ServeError(f"port {port} on {host} is {reason}: choose another with {flag}") from None
    return s


def check_free(host: str, port: int, flag: str) -> None:
    """A one-line error if `port` on `host` is taken, before any work (the server binds it later)."""
    bind(host, port, flag).close()


def start(server: Server, repository: Path, ports: Ports, locks: Locks, host: str = "127.0.0.1", log_file=None) -> subprocess.Popen:
    """tritonserver on `repository`, locked, in a process group of its own (its model stubs are its children), ended by
    the kernel if this process dies first. Its output goes to `log_file` (an open file; None: this terminal)."""
    command = [str(server.binary), f"--model-repository={repository}", f"--grpc-port={ports.grpc}", f"--grpc-address={host}",
               f"--metrics-port={ports.metrics}", f"--metrics-address={host}", "--exit-on-error=true", "--disable-auto-complete-config",
               "--strict-readiness=true", *locks.arguments()]
    command += [f"--http-port={ports.http}", f"--http-address={host}"] if ports.http else ["--allow-http=false"]
    if server.backends:
        command.append(f"--backend-directory={server.backends}")
    try:
        return subprocess.Popen(command, env=server.env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_end_with_parent)
    except OSError as e:
        raise ServeError(f"{server.binary}: cannot start it ({e.strerror})") from None


def _end_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (even by SIGKILL), so no server outlives `serve` (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def wait_ready(process: subprocess.Popen, grpc_address: str, locks: Locks, timeout: float = 600.0, log: Path | None = None) -> str:
    """Until the server answers ready over gRPC (its models loaded and warmed up); returns its version. An error if it
    exits first (with the reason its log gives) or takes longer than `timeout` seconds."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_address)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServeError(f"tritonserver exited with status {process.returncode} before it was ready{_reason(log)}")
            try:
                if client.is_server_ready(headers=locks.grpc_headers()):
                    return client.get_server_metadata(headers=locks.grpc_headers()).version
            except Exception:  # noqa: BLE001 -- not listening yet
                pass
            time.sleep(0.25)
    finally:
        client.close()
    raise ServeError(f"tritonserver was not ready after {timeout:.0f} s{_reason(log)}")


def _reason(log: Path | None) -> str:
    """The first error line of Triton's log, as a clause (its log is long and mostly harmless on a CPU machine)."""
    if not log or not log.is_file():
        return ""
    harmless = re.compile(r"CUDA|NVML|DCGM|GPU|cuda|Pinned memory")
    for line in log.read_text(errors="replace").splitlines():
        if re.match(r"E\d{4} ", line) and not harmless.search(line):
            return ": " + re.sub(r'^E\S+ \S+ \d+ \S+\] "?|"$', "", line).strip()[:300] + f" (log: {log})"
    return f" (log: {log})"


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def is_fixed(version: str) -> bool:
    """Whether a tritonserver of this version postdates the fixes of release 25.07."""
    return parse_version(version) >= FIXED_VERSION


def stub_processes(process: subprocess.Popen) -> dict[int, str]:
    """The model processes (Python backend stubs) of a running tritonserver: pid -> model instance name."""
    import psutil

    found = {}
    try:
        for child in psutil.Process(process.pid).children(recursive=True):
            command = child.cmdline()
            if command and "triton_python_backend_stub" in command[0]:
                found[child.pid] = next((Path(c).parent.parent.name for c in command if c.endswith("model.py")), "?")
    except psutil.Error:
        pass
    return found


def stop(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to tritonserver (it unloads its models and ends their stubs), then SIGKILL to whatever of its group is left."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stubs that outlived the server, or a server that ignored SIGTERM
    except ProcessLookupError:
        pass
    process.wait()
