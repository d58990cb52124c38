"""Triton Inference Server: a model repository made from a bundle (`utrexport triton`), and a server run on it
(`utrexport serve`).

The repository holds one Python-backend model per capability of the bundle (embed; predict with a task head;
fill_mask with an MLM head). Each model folder is self-contained: config.pbtxt, and in its version folder 1/ the
model.py (utr_runtime.serving's TritonPythonModel), a copy of utr_runtime and the bundle (hard links where the
filesystem allows, so the models share one copy on disk). Its server needs Python with NumPy and the engine only.
Triton does the transport (KServe v2 over HTTP and gRPC), the queue and dynamic batching, health and metrics.

`serve` runs a `tritonserver`: the one given or on PATH (NVIDIA's Triton container), else the one in the server
environment it makes once (a virtual environment with nvidia-pytriton's tritonserver, numpy<2 and the engines:
the Python backend's stub crashes on BYTES inputs with numpy 2, so the server's Python is kept apart from this one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import utr_runtime
from utr_runtime import serving
from utr_runtime.errors import UtrError

from .writers import current_umask

MARKER = "utrexport-repository.json"  # what `--force` may replace, and what was written
# The server environment: the tritonserver that nvidia-pytriton ships (Python backend only) and the runtime's needs.
# numpy<2: the Python backend stub of tritonserver 2.51 crashes deserializing BYTES inputs with numpy 2.
SERVER_PACKAGES = ("nvidia-pytriton==0.7.0", "numpy==1.26.4", "onnxruntime==1.32.0", "openvino==2026.4.1")
SERVER_ENV_VARIABLE = "UTREXPORT_SERVER_ENV"
MODEL_PY = '''"""Triton Python-backend model written by `utrexport triton`: loads the bundle beside it once per instance and
answers batches of requests with utr_runtime.serving (a copy of the runtime beside it, so it needs only NumPy and
the engine)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from utr_runtime.serving import TritonPythonModel  # noqa: E402,F401
'''


class ServeError(UtrError):
    """The repository or the server cannot be made or started as asked."""


@dataclass
class RepositoryOptions:
    precision: str = "fp32"
    engine: str = "auto"
    device: str = "cpu"
    threads: int | None = None  # per instance; None: the cores divided among the instances
    instances: int = 1
    max_batch_size: int = 64  # sequences Triton puts in one batch (and the most one request may send)
    max_queue_delay_us: int = 2000
    max_length: int = serving.MAX_LENGTH
    capabilities: list[str] = field(default_factory=list)  # empty: all the bundle has


def write_repository(bundles, output: str | os.PathLike, options: RepositoryOptions, force: bool = False) -> list[str]:
    """Write a Triton model repository serving `bundles` (one folder, or several) at `output`, aside and then renamed
    into place; returns the models' names. One bundle's models are named by capability (embed, predict, fill_mask);
    with several, each name starts with its bundle's folder name (classifier_predict)."""
    output = Path(output)
    bundles = [bundles] if isinstance(bundles, (str, os.PathLike)) else list(bundles)
    checked = [_checked_bundle(b, options) for b in bundles]
    names = model_names(checked, options)
    _check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-"))
    try:
        os.chmod(work, 0o777 & ~current_umask())  # mkdtemp makes it 0700: a server running as another user must read it
        for bundle, models in zip(checked, names):
            _write_models(work, bundle, models, options)
        record = {"bundles": [str(b.path.resolve()) for b in checked], "models": [n for models in names for n in models],
                  "options": {k: v for k, v in vars(options).items() if k != "capabilities"}, "utrexport": utr_runtime.__version__}
        (work / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        if output.exists():
            shutil.rmtree(output)
        os.replace(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return record["models"]


def model_names(bundles: list[utr_runtime.Bundle], options: RepositoryOptions) -> list[dict[str, str]]:
    """For each bundle, its models' names by capability."""
    names = []
    for bundle in bundles:
        served = options.capabilities or serving.capabilities(bundle.task, bundle.has_lm_head)
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", bundle.path.resolve().name)
        names.append({c: c if len(bundles) == 1 else f"{stem}_{c}" for c in served})
    flat = [n for models in names for n in models.values()]
    if len(set(flat)) < len(flat):
        raise ServeError("two bundles have the same folder name, so their models would have the same names: rename one folder")
    return names


def _checked_bundle(bundle, options: RepositoryOptions) -> utr_runtime.Bundle:
    checked = utr_runtime.Bundle(bundle)
    checked.check_files()  # every checksum now: a repository is never made from a damaged bundle
    served = serving.capabilities(checked.task, checked.has_lm_head)
    wrong = [c for c in options.capabilities if c not in served]
    if wrong:
        raise ServeError(f"{bundle} cannot serve {', '.join(wrong)}: it serves {', '.join(served)}")
    if options.precision != "bf16" and options.precision not in checked.precisions:
        raise ServeError(f"{bundle} has no {options.precision} model (it has {', '.join(checked.precisions)})")
    if options.device == "tensorrt" and options.precision not in checked.engines:
        raise ServeError(f"{bundle} has no TensorRT engine for {options.precision}: build it on the serving GPU with "
                         f"utrexport engine {bundle} --precision {options.precision}")
    return checked


def _check_output(output: Path, force: bool) -> None:
    if not (output.exists() or output.is_symlink()):
        return
    if not force:
        raise ServeError(f"{output} exists; pass --force to replace it")
    if output.is_symlink() or not (output / MARKER).is_file():
        raise ServeError(f"{output} is not a repository utrexport wrote; --force replaces those only: choose another output")


def _write_models(work: Path, bundle: utr_runtime.Bundle, models: dict[str, str], options: RepositoryOptions) -> None:
    """One model folder per capability: config.pbtxt, and 1/ with model.py, the runtime and the bundle."""
    hidden = int(bundle.manifest["model"]["config"]["hidden_size"])
    runtime = Path(utr_runtime.__file__).parent
    first = None
    for capability, name in models.items():
        version = work / name / "1"
        version.mkdir(parents=True)
        (work / name / "config.pbtxt").write_text(model_config(name, capability, hidden, bundle.task, options))
        (version / "model.py").write_text(MODEL_PY)
        shutil.copytree(runtime, version / "utr_runtime", ignore=shutil.ignore_patterns("__pycache__"))
        _link_tree(first or bundle.path, version / "bundle", ["manifest.json", *bundle.manifest["files"]])
        first = first or version / "bundle"


def _link_tree(source: Path, target: Path, names: list[str]) -> None:
    """The bundle's manifest and the files it lists, as hard links where the filesystem allows (else copies)."""
    target.mkdir()
    for name in names:
        try:
            os.link(source / name, target / name)
        except OSError:
            shutil.copy2(source / name, target / name)


def model_config(name: str, capability: str, hidden_size: int, task: dict | None, options: RepositoryOptions) -> str:
    """config.pbtxt of one model: its interface (utr_runtime.serving.interface), batching, instances, parameters."""
    inputs, outputs = serving.interface(capability, hidden_size, task)

    def tensors(entries):
        return ",\n".join(f'  {{ name: "{t.name}" data_type: TYPE_{t.dtype} dims: [ {", ".join(map(str, t.dims))} ] }}' for t in entries)

    kind = "KIND_CPU" if options.device == "cpu" else "KIND_GPU"
    parameters = {"capability": capability, "bundle": "bundle", "precision": options.precision, "engine": options.engine,
                  "device": options.device, "threads": str(options.threads or ""), "max_length": str(options.max_length)}
    lines = [
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {options.max_batch_size}",
        f"input [\n{tensors(inputs)}\n]",
        f"output [\n{tensors(outputs)}\n]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}",
        f"instance_group [ {{ count: {options.instances} kind: {kind} }} ]",
        *(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in parameters.items()),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- the server


@dataclass
class Server:
    """Where `tritonserver` is and the environment it runs in."""

    binary: Path
    backends: Path | None  # --backend-directory (None: the server's own)
    env: dict


def find_server(tritonserver: str | None, server_env: str | os.PathLike | None, log) -> Server:
    """The tritonserver given, or on PATH (NVIDIA's container: its own Python runs the models), or the one in the
    server environment (made on first use)."""
    given = tritonserver or shutil.which("tritonserver")
    if given:
        if not os.access(given, os.X_OK):
            raise ServeError(f"{given}: not an executable tritonserver")
        return Server(Path(given), None, dict(os.environ))
    env = Path(server_env or os.environ.get(SERVER_ENV_VARIABLE) or Path.home() / ".cache" / "utrexport" / "triton-server")
    ready = env / "ready"
    if not ready.is_file() or ready.read_text().split() != list(SERVER_PACKAGES):  # none yet, or made for other versions
        make_server_env(env, log)
    return _server_in(env)


def make_server_env(env: Path, log) -> None:
    """A virtual environment of this Python with SERVER_PACKAGES, and tritonserver's Python backend set up in it."""
    _check_shared_libpython()
    log(f"making the server environment in {env} (once: about 400 MB of packages from the package index)")
    shutil.rmtree(env, ignore_errors=True)
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
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> "Ports":
        """Three ports free on this machine now (tests and benchmarks: each server on its own)."""
        sockets = [socket.socket() for _ in range(3)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in sockets]
        for s in sockets:
            s.close()
        return cls(*ports)


def start(server: Server, repository: Path, ports: Ports, host: str = "0.0.0.0", log_file=None) -> subprocess.Popen:
    """tritonserver on `repository`, in a process group of its own (its model stubs are its children), ended by the
    kernel if this process dies first."""
    command = [str(server.binary), f"--model-repository={repository}", f"--http-port={ports.http}", f"--grpc-port={ports.grpc}",
               f"--metrics-port={ports.metrics}", f"--http-address={host}", f"--grpc-address={host}", f"--metrics-address={host}",
               "--exit-on-error=true", "--disable-auto-complete-config", "--strict-readiness=true"]
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


def wait_ready(process: subprocess.Popen, host: str, http_port: int, timeout: float = 600.0) -> None:
    """Until the server answers ready on HTTP; an error if it exits or takes longer than `timeout` seconds."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    address = f"[{host}]" if ":" in host else host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServeError(f"tritonserver exited with status {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://{address}:{http_port}/v2/health/ready", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise ServeError(f"tritonserver was not ready after {timeout:.0f} s")


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
