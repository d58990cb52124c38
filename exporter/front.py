"""The front of `utrexport serve`: the HTTP server that clients reach, in front of a tritonserver kept on loopback.

It speaks the APIs clients use, OpenAI's `POST /v1/embeddings` (and `GET /v1/models`) and the KServe v2 routes a
client needs (health, model metadata and readiness, inference), checks the API key and every limit, and passes what
it accepted to Triton over gRPC, so Triton's dynamic batcher still batches the requests of many clients. Every other
route is 404: Triton's admin APIs are never reachable through it. It translates and guards; it batches nothing.

Built on Starlette (the ASGI toolkit under FastAPI: routing, requests and responses, nothing more, which is all a
translating front needs) served by uvicorn (llhttp's parser through httptools, or h11's; not Triton's old one), on uvloop where installed.
Requests are refused up front, before any body reaches Triton: 401 (key), 413 (body or request over a limit), 429
(too many requests waiting, with Retry-After), 400 (malformed, one line), 503 (shutting down); each refusal is one
line in the log, and never affects another request. A request whose client hangs up is cancelled at Triton.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
from dataclasses import dataclass, field

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from utr_runtime import serving

from . import kserve

LIVE, READY = "/v2/health/live", "/v2/health/ready"
BODY_TIMEOUT = 60.0  # seconds a request body may take to arrive: a client that trickles it holds a place meanwhile
GRPC_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
               "DEADLINE_EXCEEDED": 504, "UNAUTHENTICATED": 401}
OPENAI_TYPES = {400: "invalid_request_error", 408: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 499: "cancelled", 503: "server_error", 500: "server_error", 504: "server_error"}


@dataclass(frozen=True)
class ServedModel:
    """One model of the repository, as the front describes and checks it."""

    name: str
    capability: str
    k: int
    hidden_size: int
    task: dict | None = None

    def interface(self):
        return serving.interface(self.capability, self.hidden_size, self.task)

    @property
    def input(self) -> str:
        """The name of the model's one input (`sequence`, or `text` for fill-mask)."""
        return self.interface()[0][0].name

    def outputs_for(self, parameters: dict) -> list[str]:
        """The outputs the model answers a request with these parameters."""
        if self.capability == "embed":
            return ["tokens", "length"] if parameters.get("pooling") == "tokens" else ["embedding"]
        return [t.name for t in self.interface()[1]]


@dataclass
class FrontOptions:
    triton_grpc: str  # Triton's gRPC address, on loopback
    limits: serving.Limits = serving.Limits()
    api_key: str | None = field(default=None, repr=False)
    triton_headers: dict = field(default_factory=dict, repr=False)  # what Triton's own locks ask of the front
    max_body_bytes: int = 16 * 2**20
    max_waiting: int = 256  # requests inside the front at once (queued at Triton or running); past it: 429


class Refusal(Exception):
    """A request refused with `status` and a one-line message."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}


class Front:
    """The ASGI application. `ready` is set by `serve` once Triton has loaded and warmed up every model, and cleared
    when a model process dies; `drain()` refuses new requests with 503 and waits for those in flight."""

    def __init__(self, models: list[ServedModel], options: FrontOptions, log=print):
        self.models = {m.name: m for m in models}
        self.options, self.log = options, log
        self.ready = self.draining = False
        self.in_flight = 0
        self._client = None
        self.router = Router(routes=[
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v2/models/{name}", self.metadata, methods=["GET"]),
            Route("/v2/models/{name}/ready", self.model_ready, methods=["GET"]),
            Route("/v2/models/{name}/infer", self.infer, methods=["POST"]),
        ], default=self._not_found)

    # ------------------------------------------------------------------------------------------ the gate

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.router(scope, receive, send)
        path = scope["path"]
        try:
            if path == LIVE:
                return await Response(status_code=200)(scope, receive, send)
            if path == READY:
                ready = self.ready and not self.draining and await self._triton_ready()
                return await Response(status_code=200 if ready else 503)(scope, receive, send)
            if self.draining:
                raise Refusal(503, "the server is shutting down; retry on another replica", headers={"Retry-After": "5", "Connection": "close"})
            self._check_key(scope)
            if self.in_flight >= self.options.max_waiting:
                raise Refusal(429, f"{self.in_flight} requests are waiting, this server's max_waiting (--max-waiting raises it); retry shortly",
                              headers={"Retry-After": "1"})
        except Refusal as refusal:
            return await self._refuse(scope, refusal)(scope, receive, send)
        self.in_flight += 1
        try:
            await self.router(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _check_key(self, scope) -> None:
        if not self.options.api_key:
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, f"Bearer {self.options.api_key}".encode()):
            raise Refusal(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'" if given else
                          "no API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")

    def _refuse(self, scope, refusal: Refusal) -> Response:
        """The error answer, in OpenAI's shape on /v1 routes and KServe's ({"error": message}) on the others; one log line."""
        self.log(f"{refusal.status} {scope.get('method', '')} {scope['path'][:200]}: {refusal.message}")
        if scope["path"].startswith("/v1/"):
            body = {"error": {"message": refusal.message, "type": OPENAI_TYPES.get(refusal.status, "invalid_request_error"),
                              "param": refusal.param, "code": refusal.code}}
        else:
            body = {"error": refusal.message}
        return JSONResponse(body, status_code=refusal.status, headers=refusal.headers)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def drain(self, timeout: float) -> int:
        """Refuse new requests (503) and wait up to `timeout` s for those in flight; returns how many were left."""
        self.draining = True
        deadline = asyncio.get_running_loop().time() + timeout
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight

    # ------------------------------------------------------------------------------------------ routes

    async def _not_found(self, scope, receive, send) -> None:
        """Every route not above (Triton's admin, statistics and server metadata among them), and wrong methods."""
        await self._refuse(scope, Refusal(404, f"no route {scope.get('method', '')} {scope['path'][:100]} on this server"))(scope, receive, send)

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "utrexport"}
                                                        for m in self.models.values() if m.capability == "embed"]})

    async def metadata(self, request: Request) -> Response:
        model = self._model(request)
        inputs, outputs = model.interface()

        def describe(t):
            return {"name": t.name, "datatype": "BYTES" if t.dtype == "STRING" else t.dtype, "shape": [-1, *t.dims]}

        return JSONResponse({"name": model.name, "versions": ["1"], "platform": "python", "inputs": [describe(t) for t in inputs],
                             "outputs": [describe(t) for t in outputs]})

    async def model_ready(self, request: Request) -> Response:
        model = self._model(request)
        ready = self.ready and await self._call(lambda client: client.is_model_ready(model.name, headers=self.options.triton_headers))
        return Response(status_code=200 if ready else 503)

    async def infer(self, request: Request) -> Response:
        """KServe v2 inference, JSON or with binary tensors, checked, then run by Triton over gRPC."""
        try:
            model = self._model(request)
            names = [t.name for t in model.interface()[1]]
            body = await self._body(request)
            call = kserve.read_request(body, request.headers.get("inference-header-content-length"), model.input, names)
            texts = self._decoded(call.texts)
            self._check_limits(model, texts, call.parameters)
            answered = model.outputs_for(call.parameters)
            asked = call.outputs or answered
            missing = [name for name in asked if name not in answered]
            if missing:
                raise Refusal(400, f"output {missing[0]!r} is not answered with these parameters; this request answers {', '.join(answered)}")
            result = await self._triton_infer(request, model, call.texts, call.parameters, asked)
        except kserve.Malformed as e:
            return self._refuse(request.scope, Refusal(400, str(e)))
        except Refusal as refusal:
            return self._refuse(request.scope, refusal)
        outputs = [(o.name, o.datatype, result.as_numpy(o.name)) for o in result.get_response().outputs]
        # In a thread: a large JSON answer takes a while to write, and other requests must not wait behind it.
        body, headers = await asyncio.to_thread(kserve.write_answer, model.name, outputs, call.binary, call.binary_all, call.id)
        return Response(body, headers=headers)

    async def embeddings(self, request: Request) -> Response:
        """OpenAI's embeddings API: mean-pooled embeddings of each input text, as float lists or base64 float32."""
        try:
            asked = self._json(await self._body(request))
            model = self._openai_model(asked)
            texts = self._openai_input(asked, model)
            encoding = asked.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise Refusal(400, f"encoding_format must be 'float' or 'base64', not {json.dumps(encoding)[:40]}", param="encoding_format")
            self._check_limits(model, texts, {"pooling": "mean"})
            result = await self._triton_infer(request, model, [t.encode() for t in texts], {}, ["embedding"])
        except Refusal as refusal:
            return self._refuse(request.scope, refusal)
        vectors = result.as_numpy("embedding").astype("<f4")
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.tobytes()).decode() if encoding == "base64" else v.tolist()}
                for i, v in enumerate(vectors)]
        tokens = sum(max(len(t) - model.k + 1, 0) for t in texts)  # the k-mers run (each sequence's tokens, specials aside)
        return JSONResponse({"object": "list", "data": data, "model": model.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ------------------------------------------------------------------------------------------ checks

    def _model(self, request: Request) -> ServedModel:
        name = request.path_params["name"]
        if name not in self.models:
            raise Refusal(404, f"unknown model {name[:80]!r}; this server serves {', '.join(self.models)}")
        return self.models[name]

    async def _body(self, request: Request) -> bytes:
        """The body, read no further than --max-body-bytes (413 past it, whatever Content-Length says)."""
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        over = Refusal(413, f"the request body is over this server's max_body_bytes of {limit:,} (--max-body-bytes raises it)",
                       code="request_too_large")
        if declared and declared.isdigit() and int(declared) > limit:
            raise over

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise over
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), BODY_TIMEOUT)
        except asyncio.TimeoutError:
            raise Refusal(408, f"the request body did not arrive within {BODY_TIMEOUT:g} s") from None

    @staticmethod
    def _json(body: bytes) -> dict:
        try:
            asked = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise Refusal(400, f"the body is not valid JSON ({str(e).splitlines()[0][:120]})") from None
        if not isinstance(asked, dict):
            raise Refusal(400, "the body must be a JSON object")
        return asked

    def _openai_model(self, asked: dict) -> ServedModel:
        unknown = sorted(set(asked) - {"input", "model", "encoding_format", "dimensions", "user"})
        if unknown:
            raise Refusal(400, f"unknown field {unknown[0]!r}", param=unknown[0])
        embed = [m for m in self.models.values() if m.capability == "embed"]
        name = asked.get("model")
        model = self.models.get(name) if isinstance(name, str) else None
        if model is None or model.capability != "embed":
            raise Refusal(404, f"the model {str(name)[:80]!r} does not exist; this server embeds with {', '.join(m.name for m in embed)}",
                          param="model", code="model_not_found")
        if asked.get("dimensions") is not None:
            raise Refusal(400, f"dimensions is not supported: {model.name}'s embeddings have {model.hidden_size} dimensions", param="dimensions")
        return model

    @staticmethod
    def _openai_input(asked: dict, model: ServedModel) -> list[str]:
        texts = asked.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
            return texts
        if isinstance(texts, list) and texts and all(isinstance(t, int) or isinstance(t, list) for t in texts):
            raise Refusal(400, "token-id input is not supported: send sequences as text", param="input")
        raise Refusal(400, "input must be a sequence (a string) or a non-empty list of sequences", param="input")

    @staticmethod
    def _decoded(texts: list[bytes]) -> list[str]:
        try:
            return serving.decode(texts)
        except serving.RequestError as e:
            raise Refusal(400, str(e)) from None

    def _check_limits(self, model: ServedModel, texts: list[str], parameters: dict) -> None:
        problem = self.options.limits.check(model.capability, texts, parameters, model.k)
        if problem:
            raise Refusal(problem.status, str(problem), code="request_too_large" if problem.status == 413 else None)

    # ------------------------------------------------------------------------------------------ Triton

    async def _call(self, ask):
        """`ask(client)` on the gRPC client of Triton (made in this event loop on first use)."""
        if self._client is None:
            import tritonclient.grpc.aio as grpcclient

            self._client = grpcclient.InferenceServerClient(self.options.triton_grpc)
        return await ask(self._client)

    async def _triton_ready(self) -> bool:
        try:
            return bool(await self._call(lambda client: client.is_server_ready(headers=self.options.triton_headers)))
        except Exception:  # noqa: BLE001 -- a server that cannot answer is not ready
            return False

    async def _triton_infer(self, request: Request, model: ServedModel, texts: list[bytes], parameters: dict, outputs: list[str]):
        """One inference at Triton; cancelled there if the client hangs up first."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        tensor = grpcclient.InferInput(model.input, [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(np.array(texts, dtype=object).reshape(-1, 1))
        wanted = [grpcclient.InferRequestedOutput(name) for name in outputs]
        work = asyncio.ensure_future(self._call(lambda client: client.infer(model.name, [tensor], outputs=wanted, parameters=parameters or None,
                                                                               headers=self.options.triton_headers)))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            raise Refusal(499, "the client closed the connection; the request was cancelled")
        gone.cancel()
        try:
            return work.result()
        except InferenceServerException as e:
            status = GRPC_STATUS.get(str(e.status()).replace("StatusCode.", ""), 500)
            raise Refusal(status, (e.message() or "the server failed").strip().splitlines()[0][:500]) from None


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read by then, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
