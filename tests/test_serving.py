"""Serving: a real tritonserver (`utrexport serve`) answers as utr_runtime does in this process.

Every server listens on 127.0.0.1 only, every request loop is bounded, and every server is stopped (a fixture's
finalizer, or the test itself). The server's environment is $UTREXPORT_SERVER_ENV (`make test` makes it first with
`utrexport serve --setup`). Expected answers come from the runtime's Model methods directly, never from
utr_runtime.serving, whose code is what the server runs.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

import utr_runtime
from conftest import real_sequences
from utr_runtime.serving import Service
from utrexport import triton, tritonserver

UTREXPORT = str(Path(sys.executable).parent / "utrexport")
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
# Server and in-process runs use the same code, engine and bundle; only how sequences share batches differs.
TOLERANCE = 1e-5
MAX_LENGTH = 3000  # the test server's --max-length (nt)
QUEUE_DELAY_US = 50_000  # long enough that a burst of concurrent requests meets in the batcher's queue


class Served:
    """A running `utrexport serve` (its front on `http`, Triton's gRPC and metrics on loopback), or a tritonserver started
    on a written repository (its own HTTP on `http`), on free local ports."""

    def __init__(self, log: Path, command: list[str] | None = None, repository: Path | None = None, env: dict | None = None):
        ports = tritonserver.Ports.free()
        self.http, self.grpc, self.metrics = ports.http, ports.grpc, ports.metrics
        self.log = log
        self.locks = tritonserver.Locks()
        with open(log, "wb") as out:
            if repository is None:
                self.process = subprocess.Popen(command + ["--http-port", str(self.http), "--grpc-port", str(self.grpc),
                                                           "--metrics-port", str(self.metrics), "--triton-log", str(log.with_suffix(".triton.log"))],
                                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
            else:
                server = tritonserver.find_server(None, None, print)
                self.process = tritonserver.start(server, repository, ports, self.locks, "127.0.0.1", out)
        try:
            self.wait_ready()
        except Exception:
            self.stop()
            raise AssertionError(f"the server did not start:\n{self.log.read_text()[-3000:]}") from None

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the server exited"
            if self.get("/v2/health/ready")[0] == 200:
                return
            time.sleep(0.25)
        raise AssertionError("not ready in time")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url(path), headers=headers or {}), timeout=30) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except urllib.error.URLError:
            return 0, b""

    def infer(self, model: str, texts: list[str], parameters: dict | None = None, name: str = "sequence"):
        """KServe v2 JSON over HTTP: {output: array}, or (status, error message) for a failed request."""
        body = {"inputs": [{"name": name, "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}]}
        if parameters:
            body["parameters"] = parameters
        request = urllib.request.Request(self.url(f"/v2/models/{model}/infer"), data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                outputs = json.load(answer)["outputs"]
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)["error"]
        return {o["name"]: np.array(o["data"], dtype=object if o["datatype"] == "BYTES" else None).reshape(o["shape"]) for o in outputs}

    def infer_grpc(self, model: str, texts: list, parameters: dict | None = None, name: str = "sequence"):
        """The same over gRPC (tritonclient, binary tensors: any bytes can be sent)."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc}")
        data = np.array([[t.encode() if isinstance(t, str) else t] for t in texts], dtype=object)
        tensor = grpcclient.InferInput(name, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        try:
            result = client.infer(model, [tensor], parameters=parameters)
        except InferenceServerException as e:
            return "error", e.message()
        finally:
            client.close()
        return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}

    def statistics(self, model: str) -> dict:
        """Triton's statistics of a model, over gRPC on loopback (the front does not serve them)."""
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc}")
        try:
            stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        finally:
            client.close()
        return {"inference_count": int(stats.get("inference_count", 0)), "execution_count": int(stats.get("execution_count", 0))}

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        tritonserver.stop(self.process) if self.process.returncode is None else None


def serve(tmp_path_factory, bundles, *options) -> Served:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    return Served(log, [UTREXPORT, "serve", *map(str, bundles), "--max-queue-delay-us", str(QUEUE_DELAY_US), "--max-length", str(MAX_LENGTH),
                        "--threads", "1", "--max-token-rows", "20000", *options])


@pytest.fixture(scope="module")
def bundles(tiny_bundle, task_bundle):
    return {"mlm": tiny_bundle(3, "pretraining"), "sequence": task_bundle(3, "sequence", "multiclass"),
            "nucleotide": task_bundle(3, "nucleotide", "binary"), "contact": task_bundle(3, "contact", "multilabel")}


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    served = serve(tmp_path_factory, bundles.values())
    yield served
    served.stop()


def model_name(bundle, capability: str) -> str:
    return f"{Path(bundle).name}_{capability}"


@pytest.fixture(scope="module")
def local(bundles):
    """The same bundles loaded in this process, on the engine the server chose (auto)."""
    return {kind: utr_runtime.load(path, threads=1) for kind, path in bundles.items()}


def seqs(n: int, longest: int | None = None) -> list[str]:
    """Real 3'UTRs of varied lengths; `longest` caps them (contact maps fit one window)."""
    found = [s for _, s in real_sequences()]
    if longest:
        found = [s[:longest] for s in found]
    return found[:n]


LONG = max((s for _, s in real_sequences()), key=len)[:MAX_LENGTH]  # several windows of 510 3-mers


def close(server_value, local_value) -> None:
    np.testing.assert_allclose(np.asarray(server_value, np.float64), np.asarray(local_value, np.float64), rtol=0, atol=TOLERANCE)


# ------------------------------------------------------------------------------------------------ answers


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "tokens"])
def test_embeddings_equal_in_process(server, bundles, local, protocol, pooling):
    texts = seqs(4) + [LONG]
    infer = server.infer if protocol == "http" else server.infer_grpc
    answer = infer(model_name(bundles["mlm"], "embed"), texts, {"pooling": pooling})
    expected = local["mlm"].embed(texts, pooling=pooling)
    if pooling != "tokens":
        assert set(answer) == {"embedding"} and answer["embedding"].shape == (5, 32)
        close(answer["embedding"], expected)
        return
    assert set(answer) == {"tokens", "length"} and answer["tokens"].shape == (5, len(LONG) - 2, 32)
    assert answer["length"].reshape(-1).tolist() == [len(t) - 2 for t in texts] == [len(e) for e in expected]
    assert len(expected[-1]) > 2 * 510  # the long one really spans several windows
    for row, want in zip(answer["tokens"], expected):
        close(row[: len(want)], want)
        assert not row[len(want):].any()  # padding is zeros


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_predictions_of_every_level_equal_in_process(server, bundles, local, protocol):
    infer = server.infer if protocol == "http" else server.infer_grpc
    texts = seqs(3) + [LONG]
    answer = infer(model_name(bundles["sequence"], "predict"), texts, {"aggregate": "max"})
    close(answer["predictions"], local["sequence"].predict(texts, aggregate="max"))
    answer = infer(model_name(bundles["sequence"], "predict"), texts[:2], {"logits": True})
    close(answer["predictions"], local["sequence"].predict(texts[:2], logits=True))

    expected = local["nucleotide"].predict(texts)
    answer = infer(model_name(bundles["nucleotide"], "predict"), texts)
    assert answer["length"].reshape(-1).tolist() == [len(e) for e in expected] == [len(t) for t in texts]
    for row, want in zip(answer["predictions"], expected):
        close(row[: len(want)], want)
        assert not row[len(want):].any()  # padding is zeros

    short = seqs(3, longest=300)
    expected = local["contact"].predict(short)
    answer = infer(model_name(bundles["contact"], "predict"), short)
    assert answer["length"].reshape(-1).tolist() == [len(e) for e in expected]
    for row, want in zip(answer["predictions"], expected):
        close(row[: len(want), : len(want)], want)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_fill_mask_equals_in_process(server, bundles, local, protocol):
    infer = server.infer if protocol == "http" else server.infer_grpc
    texts = ["GGUCAGCUGG<mask>CUGGUUAGACCAGAUCUGAGCCU", "ACGUAGC<mask>UAGCUUAGG<mask>CAUCCAG"]
    answer = infer(model_name(bundles["mlm"], "fill_mask"), texts, {"top_k": 3}, name="text")
    assert answer["num_masks"].reshape(-1).tolist() == [1, 2]
    for j, text in enumerate(texts):
        want = local["mlm"].fill_mask(text, top_k=3)
        want = [want] if isinstance(want[0], dict) else want
        for m, guesses in enumerate(want):
            close(answer["scores"][j, m], [g["score"] for g in guesses])
            assert answer["token_ids"][j, m].tolist() == [g["token"] for g in guesses]
            assert [t.decode() if isinstance(t, bytes) else t for t in answer["tokens"][j, m]] == [g["token_str"] for g in guesses]
            assert [t.decode() if isinstance(t, bytes) else t for t in answer["sequences"][j, m]] == [g["sequence"] for g in guesses]
    assert np.isnan(answer["scores"][0, 1]).all() and (answer["token_ids"][0, 1] == -1).all()  # the one-mask text, padded


# ------------------------------------------------------------------------------------------------ batching and errors


def test_64_concurrent_requests_are_batched_and_each_answered_as_alone(server, bundles, local):
    model = model_name(bundles["mlm"], "embed")
    before = server.statistics(model)
    texts = [s[:400] for s in seqs(64)]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda t: server.infer(model, [t]), texts))
    expected = local["mlm"].embed(texts)
    for answer, want in zip(answers, expected):
        close(answer["embedding"][0], want)
    after = server.statistics(model)
    requests = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert requests == 64 and executions < requests / 4, (requests, executions)  # the dynamic batcher put them together


BAD = {
    "empty": ("", "no 3-mer"),
    "shorter than k": ("AC", "no 3-mer"),
    "binary": (b"\x00\x01\x02ACGU\x7f\x00", "control character"),
    "not UTF-8": (b"ACGU\xff\xfeACGU", "not UTF-8"),
    "over max-length": ("ACGU" * (MAX_LENGTH // 4 + 1), "max_length"),
    "foreign letter, strict": ("ACGUACGURACGU", "strict"),
}


def test_a_bad_request_fails_alone_with_one_line(server, bundles, local):
    model = model_name(bundles["mlm"], "embed")
    good = seqs(8)
    jobs = [(t, None) for t in good] + [(text, {"strict": True} if "strict" in what else None) for what, (text, _) in BAD.items()]
    before = server.statistics(model)
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: server.infer_grpc(model, [job[0]], job[1]), jobs))
    after = server.statistics(model)
    assert after["execution_count"] - before["execution_count"] < len(jobs)  # bad requests shared batches with good ones
    for answer, want in zip(answers, local["mlm"].embed(good)):
        close(answer["embedding"][0], want)
    for (what, (_, expected)), answer in zip(BAD.items(), answers[len(good):]):
        assert answer[0] == "error" and expected in answer[1] and "\n" not in answer[1], (what, answer)
    # In one request, one bad sequence fails that request and names it; an unknown or wrong parameter too.
    assert server.infer(model, [good[0], "AC"]) == (400, "sequence 1: no 3-mer: the sequence is empty or shorter than k=3")
    status, message = server.infer(model, [good[0]], {"pooling": "max"})
    assert status == 400 and message.startswith("parameter pooling must be one of")
    status, message = server.infer(model, [good[0]], {"colour": "red"})
    assert status == 400 and "unknown parameter 'colour'" in message
    status, message = server.infer(model_name(bundles["mlm"], "fill_mask"), ["ACGUAGCUAG"], name="text")
    assert status == 400 and "no <mask> token" in message
    assert server.get("/v2/health/ready")[0] == 200


def test_health_metadata_and_metrics(server, bundles):
    assert server.get("/v2/health/live")[0] == 200 and server.get("/v2/health/ready")[0] == 200
    model = model_name(bundles["sequence"], "predict")
    assert server.get(f"/v2/models/{model}/ready")[0] == 200
    status, body = server.get(f"/v2/models/{model}")
    metadata = json.loads(body)
    assert status == 200 and metadata["inputs"] == [{"name": "sequence", "datatype": "BYTES", "shape": [-1, 1]}]
    assert metadata["outputs"] == [{"name": "predictions", "datatype": "FP32", "shape": [-1, 3]}]
    server.infer(model, seqs(1))
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=30) as answer:
        metrics = answer.read().decode()
    assert re.search(rf'nv_inference_request_success\{{model="{model}",version="1"\}} [1-9]', metrics), metrics[:2000]


# ------------------------------------------------------------------------------------------------ lifecycle


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: the terminal was closed
def test_sigterm_stops_the_server_and_leaves_no_process(tmp_path_factory, bundles, sig):
    served = serve(tmp_path_factory, [bundles["mlm"]], "--model", "embed")
    children = served.children()
    assert any("tritonserver" in p.name() for p in children) and any("stub" in " ".join(p.cmdline()) for p in children)
    scratch = re.search(r"--model-repository=(\S+)", " ".join(" ".join(p.cmdline()) for p in children)).group(1)
    served.process.send_signal(sig)
    assert served.process.wait(60) == 0
    time.sleep(0.5)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not Path(scratch).exists()  # the temporary repository is removed
    assert "stopped" in served.log.read_text()


def test_a_wrong_answer_is_caught(tmp_path, bundles, local):
    """The comparison above can fail: a repository whose model is off by 1e-4 is caught (tritonserver run directly on a
    repository written by `utrexport triton`, as in NVIDIA's container)."""
    repository = tmp_path / "repo"
    done = subprocess.run([UTREXPORT, "triton", str(bundles["mlm"]), "-o", str(repository), "--model", "embed", "--threads", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with open(repository / "embed" / "1" / "model.py", "a") as f:
        f.write("\nfrom utr_runtime import serving\n_pack = serving.Service._pack\n"
                "serving.Service._pack = lambda self, results: {k: v + 1e-4 for k, v in _pack(self, results).items()}\n")
    served = Served(tmp_path / "server.log", repository=repository)
    try:
        texts = seqs(2)
        answer = served.infer("embed", texts)
        with pytest.raises(AssertionError):
            close(answer["embedding"], local["mlm"].embed(texts))
        close(answer["embedding"] - 1e-4, local["mlm"].embed(texts))  # and it is exactly that error
    finally:
        served.stop()


def test_a_bundle_changed_in_the_repository_is_refused_when_the_model_loads(tmp_path, bundles):
    repository = tmp_path / "repo"
    triton.write_repository(bundles["mlm"], repository, triton.RepositoryOptions(capabilities=["embed"]))
    model = repository / "embed" / "1" / "bundle" / "model.fp32.onnx"
    data = bytearray(model.read_bytes())
    model.unlink()  # a hard link to the source bundle: write a new file, never through the link
    data[-100] ^= 1
    model.write_bytes(bytes(data))
    log = tmp_path / "server.log"
    with pytest.raises(AssertionError, match="did not start"):
        Served(log, repository=repository)
    assert "checksum mismatch for model.fp32.onnx" in log.read_text()
    assert utr_runtime.Bundle(bundles["mlm"]).check_files() is None  # the source bundle is untouched


# ------------------------------------------------------------------------------------------------ the repository


def test_repository_layout_and_config(tmp_path, bundles):
    options = triton.RepositoryOptions(precision="fp32", instances=2, max_batch_size=16, max_queue_delay_us=500)
    names = triton.write_repository(bundles["sequence"], tmp_path / "repo", options)
    assert names == ["embed", "predict"]
    config = (tmp_path / "repo" / "predict" / "config.pbtxt").read_text()
    for line in ['name: "predict"', 'backend: "python"', "max_batch_size: 16", 'name: "sequence" data_type: TYPE_STRING dims: [ 1 ]',
                 'name: "predictions" data_type: TYPE_FP32 dims: [ 3 ]', "dynamic_batching { max_queue_delay_microseconds: 500 }",
                 "instance_group [ { count: 2 kind: KIND_CPU } ]", 'key: "capability" value: { string_value: "predict" }']:
        assert line in config, line
    version = tmp_path / "repo" / "predict" / "1"
    assert (version / "model.py").is_file() and (version / "utr_runtime" / "serving.py").is_file()
    assert sorted(p.name for p in (version / "bundle").iterdir()) == sorted(["manifest.json", *utr_runtime.Bundle(bundles["sequence"]).manifest["files"]])
    utr_runtime.Bundle(version / "bundle").check_files()
    gpu = triton.model_config("embed", "embed", 32, None, triton.RepositoryOptions(device="cuda"))
    assert "kind: KIND_GPU" in gpu and 'key: "device" value: { string_value: "cuda" }' in gpu


def test_repository_refusals_are_one_line(tmp_path, bundles):
    def run(*args):
        return subprocess.run([UTREXPORT, "triton", *map(str, args)], capture_output=True, text=True)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    cases = [
        ((bundles["mlm"], "-o", tmp_path / "mine"), "exists; pass --force"),
        ((bundles["mlm"], "-o", tmp_path / "mine", "--force"), "not a repository utrexport wrote"),
        ((bundles["mlm"], "-o", tmp_path / "r", "--model", "predict"), "cannot serve predict"),
        ((bundles["mlm"], "-o", tmp_path / "r", "--precision", "int8"), "has no int8 model"),
        ((bundles["mlm"], bundles["mlm"], "-o", tmp_path / "r"), "would give models the same names"),
        ((tmp_path / "nothing", "-o", tmp_path / "r"), "nothing"),
    ]
    for args, expected in cases:
        done = run(*args)
        assert done.returncode == 1 and expected in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x" and not (tmp_path / "r").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left
    assert run(bundles["mlm"], "-o", tmp_path / "r").returncode == 0 and run(bundles["mlm"], "-o", tmp_path / "r", "--force").returncode == 0


def test_service_runs_each_group_of_options_once_and_splits_answers(bundles, local):
    """Requests with the same options share one runtime call; answers come back to the request they belong to."""
    model = local["mlm"]
    calls = []
    original = model.embed
    model.embed = lambda texts, **options: calls.append((len(texts), options)) or original(texts, **options)
    try:
        texts = seqs(5)
        answers = Service(model, "embed").run([(texts[:2], {}), ([texts[2]], {"pooling": "cls"}), (texts[3:], {}), (["AC"], {})])
    finally:
        model.embed = original
    assert sorted(n for n, _ in calls) == [1, 4]
    close(answers[0]["embedding"], original(texts[:2]))
    close(answers[1]["embedding"], original([texts[2]], pooling="cls"))
    close(answers[2]["embedding"], original(texts[3:]))
    assert "no 3-mer" in str(answers[3])


# ------------------------------------------------------------------------------------------------ the README


def readme_serve_examples() -> list[tuple[str, str]]:
    section = README[README.index("## Serve") : README.index("\n## ", README.index("## Serve") + 3)]
    return re.findall(r"```(bash|python)\n(.*?)```", section, re.S)


def test_the_readme_requests_work(tmp_path_factory, bundles):
    """The README's curl requests, OpenAI client and tritonclient example, against an embed model on this test's ports."""
    served = serve(tmp_path_factory, [bundles["mlm"]], "--model", "embed")
    try:
        ran = 0
        for language, text in readme_serve_examples():
            for port, ours in ((8000, served.http), (8001, served.grpc), (8002, served.metrics)):
                text = text.replace(f"localhost:{port}", f"localhost:{ours}")
            if language == "bash":
                for command in [line for line in text.splitlines() if line.startswith("curl")]:
                    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
                    assert done.returncode == 0 and done.stdout.strip(), (command, done.stderr[-500:])
                    assert "health" in command or '"embedding"' in done.stdout, done.stdout[-500:]
                    assert "health" not in command or (done.stdout.startswith("200\n") and 'nv_inference_request_success{model="embed"' in done.stdout), done.stdout[-500:]
                    ran += 1
            elif "tritonclient" in text or "openai" in text:
                done = subprocess.run([sys.executable, "-c", text], capture_output=True, text=True, timeout=120)
                assert done.returncode == 0 and done.stdout.startswith("(2, 32)" if "tritonclient" in text else "2 32"), done.stderr[-2000:]
                ran += 1
        assert ran == 5
    finally:
        served.stop()


def test_an_engine_failure_fails_its_requests_not_the_server(local):
    """Whatever the engine raises fails the requests of that call (HTTP 500, one line); other calls are answered."""
    model = local["mlm"]
    original = model.embed

    def failing(texts, **options):
        if options["pooling"] == "cls":
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : out of memory\nmore detail")
        return original(texts, **options)

    model.embed = failing
    try:
        answers = Service(model, "embed").run([(seqs(2), {"pooling": "cls"}), (seqs(1), {})])
    finally:
        model.embed = original
    assert str(answers[0]) == "the engine failed: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : out of memory" and answers[0].internal
    close(answers[1]["embedding"], original(seqs(1)))
