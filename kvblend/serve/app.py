"""FastAPI routes: /v1/chat/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvblend.serve.guard import Guard, GuardPolicy
from kvblend.serve.protocol import ApiError, RequestLimits, chunk_body, completion_body, parse_chat_request, sse
from kvblend.serve.worker import Job, QueueFull, Worker

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _next_event(job: Job, request: Request):
    """The job's next event, or None when the client went away first (the job is then cancelled)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return None


def create_app(worker: Worker, served_model: str, policy: GuardPolicy | None = None,
               limits: RequestLimits | None = None) -> FastAPI:
    """The routes behind the Guard (policy: default loopback Hosts, no keys, no cross-site Origins)."""
    app = FastAPI(title="kvblend", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, policy=policy or GuardPolicy(), count=worker.metrics.count_request)
    _add_info_routes(app, worker, served_model)
    _add_chat_route(app, worker, served_model, limits or RequestLimits(context_tokens=worker.context))
    return app


def _add_info_routes(app: FastAPI, worker: Worker, served_model: str) -> None:
    """Error handlers, /health, /v1/models, /metrics."""
    metrics = worker.metrics
    started = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code, type_="invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(ApiError(400, str(exc).splitlines()[0], code="invalid_value"))

    @app.get("/health")
    async def health(request: Request):
        problem = metrics.store.get("disk_problem")
        status = "degraded" if problem else "ok"
        if not request.state.authenticated:  # open to everyone: says nothing else
            return {"status": status}
        return {"status": status, "model": served_model, "queue_depth": worker.depth(),
                "queue_capacity": worker.max_queue, "engine": worker.settings,
                "store": {"disk": problem or "ok"}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model, "object": "model", "created": started,
                                            "owned_by": "kvblend", "max_model_len": worker.context}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(worker.depth(), worker.max_queue),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")


def _add_chat_route(app: FastAPI, worker: Worker, served_model: str, limits: RequestLimits) -> None:
    metrics = worker.metrics

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await request.body()  # the Guard read it, within its size limit
        try:
            req = parse_chat_request(raw, limits)
            if req.model is not None and req.model != served_model:
                raise ApiError(404, f"the model '{req.model}' does not exist; this server serves "
                                    f"'{served_model}' (GET /v1/models)", param="model", code="model_not_found")
        except ApiError as exc:
            metrics.count_request("bad_request")
            return error_response(exc)
        job = Job(req, asyncio.get_running_loop(), tenant_salt=request.state.tenant_salt)
        try:
            worker.submit(job)
        except QueueFull as exc:
            metrics.count_request("rejected_queue_full")
            return error_response(ApiError(
                429, f"the server's queue is full ({worker.max_queue} requests waiting); retry after "
                     f"{exc.retry_after_s} s", code="queue_full", headers={"Retry-After": str(exc.retry_after_s)}))
        # streaming: the first event (the worker accepted the prompt) decides between an error reply and the
        # stream; otherwise wait for the answer. A client gone meanwhile: 499; an error event: its OpenAI error.
        while True:
            event = await _next_event(job, request)
            if event is None:
                return Response(status_code=499)
            kind, payload = event
            if kind == "error":
                return error_response(payload)
            if req.stream or kind == "done":
                break
        if not req.stream:
            extra = {"completion_token_ids": payload["token_ids"]}
            if payload["retrieved"]:
                extra["retrieved"] = payload["retrieved"]
            return JSONResponse(completion_body(req, served_model, payload["text"], payload["finish_reason"],
                                                payload["usage"], extra))
        return StreamingResponse(_stream(job, req, served_model), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(job: Job, req, served_model: str):
    """The SSE events of a streaming answer; the job is cancelled if the client leaves first."""
    try:
        yield sse(chunk_body(req, served_model, {"role": "assistant", "content": ""}))
        while True:
            kind, payload = await job.events.get()
            if kind == "delta":
                yield sse(chunk_body(req, served_model, {"content": payload}))
            elif kind == "error":  # after the stream started: an error event, then [DONE]
                yield sse(payload.body())
                break
            else:
                yield sse(chunk_body(req, served_model, {}, finish_reason=payload["finish_reason"]))
                if req.include_usage:
                    yield sse(chunk_body(req, served_model, {}, usage=payload["usage"], with_choice=False))
                job.finished = True
                break
        yield sse("[DONE]")
    finally:
        if not job.finished:
            job.cancel()

