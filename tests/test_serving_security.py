"""`utrexport serve` under attack: loopback by default, locked Triton APIs, the API key, limits, drain, a dead model
process, clients that hang up, and OpenAI's official client against the front.

Every server listens on loopback (one test binds the front to 0.0.0.0 and still talks to 127.0.0.1 only), every
request loop is bounded in count and time, and every server is stopped.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import mmap
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from test_serving import LONG, MAX_LENGTH, UTREXPORT, Served, close, model_name, seqs, serve

KEY = "test-key-0123456789"
LIMITS = ["--max-body-bytes", "300000", "--max-request-nt", "20000", "--max-token-rows", "4000", "--max-fill-mask-answers", "200"]


@pytest.fixture(scope="module")
def bundles(tiny_bundle, task_bundle):
    return {"mlm": tiny_bundle(3, "pretraining"), "sequence": task_bundle(3, "sequence", "multiclass")}


@pytest.fixture(scope="module")
def local(bundles):
    import utr_runtime

    return {kind: utr_runtime.load(path, threads=1) for kind, path in bundles.items()}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, bundles):
    """A server with a key (from the environment, as an operator would give it) and small limits."""
    log = tmp_path_factory.mktemp("guarded") / "server.log"
    served = Served(log, [UTREXPORT, "serve", *map(str, bundles.values()), "--max-queue-delay-us", "50000", "--max-length", str(MAX_LENGTH),
                          "--threads", "1", "--max-waiting", "8", *LIMITS], env={"UTREXPORT_API_KEY": KEY})
    yield served
    served.stop()


def request(served: Served, path: str, body: bytes | dict | None = None, key: str | None = KEY, headers: dict | None = None, timeout=60):
    """(status, headers, parsed JSON or raw bytes) of one HTTP request to the front."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(served.url(path), data=data, headers=sent), timeout=timeout) as answer:
            status, got, raw = answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as e:
        status, got, raw = e.code, dict(e.headers), e.read()
    except urllib.error.URLError:  # refused: the server has closed its port
        return 0, {}, None
    got = {k.lower(): v for k, v in got.items()}
    try:
        return status, got, json.loads(raw)
    except ValueError:
        return status, got, raw


def openai_error(answer, status: int, words: str) -> None:
    code, _, body = answer
    assert code == status, answer
    assert set(body["error"]) == {"message", "type", "param", "code"} and words in body["error"]["message"], body
    assert "\n" not in body["error"]["message"]


def listening(process: subprocess.Popen) -> list[tuple[str, int]]:
    """The addresses every process of a server listens on, read from the system."""
    found = []
    for p in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
        found += [(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    return found  # an IPv4-mapped address (gRPC's IPv6 socket) as the IPv4 address it is


# ------------------------------------------------------------------------------------------------ safe defaults


def test_by_default_every_process_listens_on_loopback_only(tmp_path, bundles):
    served = Served(tmp_path / "server.log", [UTREXPORT, "serve", str(bundles["mlm"]), "--model", "embed", "--threads", "1"])
    try:
        sockets = listening(served.process)
        assert {port for _, port in sockets} >= {served.http, served.grpc, served.metrics}, sockets
        assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets
        # A CPU start prints the project's lines only: Triton's GPU complaints and tables go to its log file, named.
        printed = served.log.read_text()
        assert "NVML" not in printed and "CudaDriverHelper" not in printed and "+----" not in printed, printed
        assert len(printed.splitlines()) == 2 and str(served.log.with_suffix(".triton.log")) in printed, printed
    finally:
        served.stop()


def test_exposed_front_keeps_tritons_ports_on_loopback(tmp_path, bundles):
    """--host 0.0.0.0 with the bundled tritonserver 2.51: only the front faces the network, and serve says why."""
    served = Served(tmp_path / "server.log", [UTREXPORT, "serve", str(bundles["mlm"]), "--model", "embed", "--threads", "1", "--host", "0.0.0.0",
                                              "--api-key-file", str(_key_file(tmp_path))])
    try:
        sockets = dict((port, ip) for ip, port in listening(served.process))
        assert sockets[served.http] == "0.0.0.0" and sockets[served.grpc] == "127.0.0.1" and sockets[served.metrics] == "127.0.0.1", sockets
        assert all(ip == "127.0.0.1" for port, ip in sockets.items() if port != served.http), sockets
        assert "predates release 25.07" in served.log.read_text()
        assert request(served, "/v1/models", key=None)[0] == 401
    finally:
        served.stop()
    done = subprocess.run([UTREXPORT, "serve", str(bundles["mlm"]), "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "needs an API key" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def _key_file(folder: Path) -> Path:
    (folder / "key").write_text(KEY + "\n")
    return folder / "key"


def test_locked_apis_are_refused_and_the_shared_memory_attack_fails(guarded, bundles):
    """The attack of the issue: register another program's shared memory and make an inference write into it."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    region = f"/utrexport-test-{os.getpid()}"
    path = Path("/dev/shm") / region.lstrip("/")
    path.write_bytes(b"\x5a" * 8192)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{guarded.grpc}")
        attempts = {
            "register system shared memory": lambda: client.register_system_shared_memory("x", region, 8192),
            "set logging": lambda: client.update_log_settings({"log_verbose_level": 1}),
            "trace settings": lambda: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
            "load a model": lambda: client.load_model(model_name(bundles["mlm"], "embed")),
            "unload a model": lambda: client.unload_model(model_name(bundles["mlm"], "embed")),
            "read a model config": lambda: client.get_model_config(model_name(bundles["mlm"], "embed")),
        }
        for what, attempt in attempts.items():
            with pytest.raises(InferenceServerException, match="restricted"):
                attempt()
        client.close()
        # Over HTTP the front has none of these routes.
        for path_, body in [("/v2/systemsharedmemory/region/x/register", {"key": region, "offset": 0, "byte_size": 8192}),
                            ("/v2/logging", {"log_verbose_level": 1}), ("/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
                            (f"/v2/repository/models/{model_name(bundles['mlm'], 'embed')}/unload", {}), ("/v2/repository/index", {}),
                            ("/v2/cudasharedmemory/region/x/register", {})]:
            assert request(guarded, path_, body)[0] == 404, path_
        # An inference asking for its output in region x is refused; the region's bytes are unchanged.
        body = {"inputs": [{"name": "sequence", "shape": [1, 1], "datatype": "BYTES", "data": [seqs(1)[0]]}],
                "outputs": [{"name": "embedding", "parameters": {"shared_memory_region": "x", "shared_memory_byte_size": 8192}}]}
        assert request(guarded, f"/v2/models/{model_name(bundles['mlm'], 'embed')}/infer", body)[0] == 400
        assert path.read_bytes() == b"\x5a" * 8192
    finally:
        path.unlink()
    assert request(guarded, "/v2")[0] == 404  # no server metadata (version) to the network


# ------------------------------------------------------------------------------------------------ OpenAI and KServe through the front


def test_openai_client_gets_the_embeddings_of_the_runtime(guarded, bundles, local):
    from openai import AuthenticationError, OpenAI

    model = model_name(bundles["mlm"], "embed")
    client = OpenAI(base_url=guarded.url("/v1"), api_key=KEY, max_retries=0, timeout=120)
    assert model in [m.id for m in client.models.list().data]
    short = seqs(1)[0][:80]
    for texts in ([short], [short, LONG]):
        expected = local["mlm"].embed(texts)
        assert len(expected) == 2 or len(texts) == 1
        for encoding in ("base64", "float"):  # base64: the client's default
            answer = client.embeddings.create(model=model, input=texts[0] if len(texts) == 1 else texts,
                                              **({"encoding_format": "float"} if encoding == "float" else {}))
            close([d.embedding for d in answer.data], expected)
            assert [d.index for d in answer.data] == list(range(len(texts)))
            assert answer.usage.prompt_tokens == sum(len(t) - 2 for t in texts)
    # The raw base64 answer is little-endian float32, as OpenAI's.
    _, _, raw = request(guarded, "/v1/embeddings", {"model": model, "input": short, "encoding_format": "base64"})
    close(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4"), expected[0])
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=guarded.url("/v1"), api_key="wrong", max_retries=0).embeddings.create(model=model, input=short)
    openai_error(request(guarded, "/v1/embeddings", {"model": model, "input": short}, key=None), 401, "API key")
    openai_error(request(guarded, "/v1/embeddings", {"model": model, "input": short}, key="wrong"), 401, "API key")
    openai_error(request(guarded, "/v1/embeddings", {"model": model, "input": [[1, 2, 3]]}), 400, "token-id")
    openai_error(request(guarded, "/v1/embeddings", {"model": model, "input": short, "dimensions": 8}), 400, "dimensions")
    openai_error(request(guarded, "/v1/embeddings", {"model": "gpt-9", "input": short}), 404, "does not exist")
    assert request(guarded, "/v2/health/live", key=None)[0] == 200 and request(guarded, "/v2/health/ready", key=None)[0] == 200


def test_tritonclient_http_through_the_front_equals_in_process(guarded, bundles, local):
    """tritonclient's HTTP client (binary tensors both ways by default) with the key, a task model's predictions."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    model = model_name(bundles["sequence"], "predict")
    texts = seqs(3) + [LONG]
    client = httpclient.InferenceServerClient(f"127.0.0.1:{guarded.http}", network_timeout=120)
    tensor = httpclient.InferInput("sequence", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    headers = {"Authorization": f"Bearer {KEY}"}
    result = client.infer(model, [tensor], parameters={"aggregate": "max"}, headers=headers)
    close(result.as_numpy("predictions"), local["sequence"].predict(texts, aggregate="max"))
    json_answer = client.infer(model, [tensor], outputs=[httpclient.InferRequestedOutput("predictions", binary_data=False)], headers=headers)
    close(json_answer.as_numpy("predictions"), local["sequence"].predict(texts))
    assert client.is_model_ready(model, headers=headers) and client.get_model_metadata(model, headers=headers)["inputs"][0]["name"] == "sequence"
    with pytest.raises(InferenceServerException):
        client.infer(model, [tensor])  # no key
    client.close()


# ------------------------------------------------------------------------------------------------ limits and malformed requests


MALFORMED = {
    "negative dimension": {"inputs": [{"name": "sequence", "shape": [-1, 1], "datatype": "BYTES", "data": ["ACGUACGU"]}]},
    "numbers in BYTES": {"inputs": [{"name": "sequence", "shape": [2, 1], "datatype": "BYTES", "data": [1, 2]}]},
    "non-object parameters": {"inputs": [{"name": "sequence", "shape": [1, 1], "datatype": "BYTES", "data": ["ACGUACGU"]}], "parameters": [1]},
    "huge shape": {"inputs": [{"name": "sequence", "shape": [4294967299, 1], "datatype": "BYTES", "data": ["A", "C", "G"]}]},
    "tokens with mean pooling": {"inputs": [{"name": "sequence", "shape": [1, 1], "datatype": "BYTES", "data": ["ACGUACGU"]}],
                                 "outputs": [{"name": "tokens"}]},
    "newline inside": {"inputs": [{"name": "sequence", "shape": [1, 1], "datatype": "BYTES", "data": ["ACGUACGU\nACGUACGU"]}]},
    "wrong input name": {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["ACGUACGU"]}]},
}


def test_malformed_and_costly_requests_are_refused_fast_and_good_ones_still_answered(guarded, bundles, local):
    embed, fill = model_name(bundles["mlm"], "embed"), model_name(bundles["mlm"], "fill_mask")
    rss = psutil.Process(guarded.process.pid).memory_info().rss
    for what, body in MALFORMED.items():
        status, _, answer = request(guarded, f"/v2/models/{embed}/infer", body)
        assert status == 400 and isinstance(answer["error"], str) and "\n" not in answer["error"], (what, status, answer)
    for what, raw in {"invalid JSON": b'{"inputs": [', "a lone surrogate": b'{"inputs": [{"name": "sequence", "shape": [1, 1], '
                      b'"datatype": "BYTES", "data": ["AC\\ud800GU"]}]}'}.items():
        assert request(guarded, f"/v2/models/{embed}/infer", raw)[0] == 400, what
    openai_error(request(guarded, "/v1/embeddings", b"{not json"), 400, "not valid JSON")
    costly = {
        "300 masks x top_k 131": (f"/v2/models/{fill}/infer", {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES",
                                                                           "data": ["ACG<mask>" * 300]}], "parameters": {"top_k": 131}}, "max_fill_mask_answers"),
        "tokens pooling of 4 x 2,999 nt": (f"/v2/models/{embed}/infer", {"inputs": [{"name": "sequence", "shape": [4, 1], "datatype": "BYTES",
                                                                                     "data": [LONG[:2999]] * 4}], "parameters": {"pooling": "tokens"}},
                                           "max_token_rows"),
        "sequences x nt": ("/v1/embeddings", {"model": embed, "input": [LONG] * 8}, "max_request_nt"),
        "65 sequences": ("/v1/embeddings", {"model": embed, "input": ["ACGUACGU"] * 65}, "max_sequences"),
        "a body over max-body-bytes": ("/v1/embeddings", {"model": embed, "input": "ACGU" * 100_000}, "max_body_bytes"),
    }
    for what, (path, body, limit) in costly.items():
        start = time.monotonic()
        status, _, answer = request(guarded, path, body)
        message = answer["error"]["message"] if path.startswith("/v1") else answer["error"]
        assert status == 413 and limit in message and "--" in message, (what, status, answer)
        assert time.monotonic() - start < 1.0, what
    status, _, answer = request(guarded, "/v1/embeddings", {"model": embed, "input": "ACGU" * (MAX_LENGTH // 4 + 1)})
    assert status == 400 and "max_length" in answer["error"]["message"]
    # A 256 MB body is refused from its Content-Length, before a byte of it is read.
    with socket.create_connection(("127.0.0.1", guarded.http), timeout=10) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " +
                  str(256 * 2**20).encode() + b"\r\n\r\n" + b"x" * 65536)
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    # One sent without a length (chunked) is cut off at the limit.
    with socket.create_connection(("127.0.0.1", guarded.http), timeout=10) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        for _ in range(6):
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    assert psutil.Process(guarded.process.pid).memory_info().rss - rss < 200 * 2**20  # the front did not keep what it refused
    good = seqs(2)
    _, _, answer = request(guarded, "/v1/embeddings", {"model": embed, "input": good, "encoding_format": "float"})
    close([d["embedding"] for d in answer["data"]], local["mlm"].embed(good))


def test_too_many_waiting_requests_get_429_and_the_rest_are_answered(guarded, bundles, local):
    embed = model_name(bundles["mlm"], "embed")
    text = [LONG[:2000]] * 6
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: request(guarded, "/v1/embeddings", {"model": embed, "input": text, "encoding_format": "float"}), range(24)))
    refused = [a for a in answers if a[0] == 429]
    assert refused and all(a[1].get("retry-after") == "1" and a[2]["error"]["type"] == "rate_limit_error" for a in refused), [a[0] for a in answers]
    answered = [a for a in answers if a[0] == 200]
    assert answered and len(answered) + len(refused) == 24
    expected = local["mlm"].embed(text[:1])[0]
    for a in answered:
        close(a[2]["data"][0]["embedding"], expected)


# ------------------------------------------------------------------------------------------------ lifecycle


def test_sigterm_answers_the_16_requests_in_flight_then_exits_0(tmp_path_factory, bundles, local):
    served = serve(tmp_path_factory, [bundles["mlm"]], "--model", "embed")
    processes = [psutil.Process(served.process.pid), *psutil.Process(served.process.pid).children(recursive=True)]
    texts = [LONG[:2500 - 10 * i] for i in range(16)]
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(request, served, "/v1/embeddings", {"model": "embed", "input": [t], "encoding_format": "float"}, None)
                       for t in texts]
            time.sleep(0.5)  # all 16 are inside the front, most queued at Triton
            served.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            assert request(served, "/v1/models", key=None)[0] in (503, 0)  # no new requests while draining
            answers = [f.result(timeout=120) for f in futures]
        assert [a[0] for a in answers] == [200] * 16
        for answer, want in zip(answers, local["mlm"].embed(texts)):
            close(answer[2]["data"][0]["embedding"], want)
        assert served.process.wait(60) == 0
    finally:
        served.stop()
    time.sleep(0.5)
    assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_killed_model_process_makes_readiness_false_and_serve_exit_nonzero(tmp_path_factory, bundles):
    """tritonserver 2.51 never restarts a dead Python-backend process and keeps answering ready; serve turns ready false
    and exits 1 (a supervisor restarts it) within WATCH_INTERVAL plus a poll."""
    served = serve(tmp_path_factory, [bundles["mlm"]], "--model", "embed")
    try:
        stubs = [p for p in psutil.Process(served.process.pid).children(recursive=True) if "stub" in " ".join(p.cmdline())]
        assert stubs and served.get("/v2/health/ready")[0] == 200
        stubs[0].kill()
        start = time.monotonic()
        while served.get("/v2/health/ready")[0] == 200 and time.monotonic() - start < 5:
            time.sleep(0.05)
        assert time.monotonic() - start < 2.0
        assert served.process.wait(60) == 1
        log = served.log.read_text()
        assert "model embed's process" in log and "died" in log and "Traceback" not in log, log[-2000:]
    finally:
        served.stop()


def test_clients_that_hang_up_are_not_computed(guarded, bundles):
    """Ten clients send heavy requests and hang up at once: the next good request is answered as fast as alone."""
    embed = model_name(bundles["mlm"], "embed")
    heavy = json.dumps({"model": embed, "input": [LONG[:2400]] * 8}).encode()
    start = time.monotonic()
    assert request(guarded, "/v1/embeddings", heavy)[0] == 200
    alone = time.monotonic() - start
    before = guarded.statistics(embed)["inference_count"]
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", guarded.http)) as s:
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer " + KEY.encode() +
                      b"\r\nContent-Length: " + str(len(heavy)).encode() + b"\r\n\r\n" + heavy)
            time.sleep(0.02)
    start = time.monotonic()
    assert request(guarded, "/v1/embeddings", {"model": embed, "input": "ACGUAGCUAGCUUAGG"})[0] == 200
    waited = time.monotonic() - start
    computed = guarded.statistics(embed)["inference_count"] - before - 1
    assert waited < 2 * alone + 1.0 and computed < 10 * 8 / 2, (waited, alone, computed)


def test_a_second_serve_on_taken_ports_says_which_in_one_line(guarded, bundles):
    done = subprocess.run([UTREXPORT, "serve", str(bundles["mlm"]), "--http-port", str(guarded.http)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and f"port {guarded.http} on 127.0.0.1 is in use" in done.stderr and "serving" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = subprocess.run([UTREXPORT, "serve", str(bundles["mlm"]), "--http-port", str(guarded.http + 7), "--grpc-port", str(guarded.grpc)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "--grpc-port" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_setup_never_removes_a_folder_it_did_not_make(tmp_path):
    """`serve --setup --server-env DIR` remakes only a server environment it made; a user's folder is refused, intact."""
    mine = tmp_path / "v"
    mine.mkdir()
    (mine / "thesis.txt").write_text("work")
    done = subprocess.run([UTREXPORT, "serve", "--setup", "--server-env", str(mine)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "did not make" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.txt"] and (mine / "thesis.txt").read_text() == "work"


def test_triton_keeps_a_folder_that_appears_while_it_writes(tmp_path, bundles, monkeypatch):
    from utrexport import triton

    output = tmp_path / "victim"
    original = triton._write_models

    def appear(*args):
        original(*args)
        output.mkdir(exist_ok=True)
        (output / "thesis.txt").write_text("work")

    monkeypatch.setattr(triton, "_write_models", appear)
    with pytest.raises(triton.ServeError, match="exists; pass --force"):
        triton.write_repository(bundles["mlm"], output, triton.RepositoryOptions(capabilities=["embed"]))
    assert (output / "thesis.txt").read_text() == "work" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_relative_tritonserver_path_is_not_searched_on_path(tmp_path, monkeypatch):
    from utrexport import tritonserver

    (tmp_path / "tritonserver").write_text("#!/bin/sh\n")
    (tmp_path / "tritonserver").chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert tritonserver.find_server("./tritonserver", None, print).binary == tmp_path / "tritonserver"
    with pytest.raises(tritonserver.ServeError, match="no such tritonserver on PATH"):
        tritonserver.find_server("tritonserver", None, print)
