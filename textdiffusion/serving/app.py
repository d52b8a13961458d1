"""The HTTP layer: FastAPI routes that validate, hand a job to the engine and relay its events.

    POST /v1/generate      prompt or <mask:N> template, every sampler setting -> texts (or SSE: every step)
    POST /v1/completions   OpenAI-compatible subset (prompt, max_tokens, temperature, top_p, n, seed, stream)
    GET  /v1/models, /healthz, /metrics (Prometheus text), /  (the live page; assets under /static)

Nothing here touches the model: the engine's thread does, so the event loop never blocks on a forward.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from textdiffusion.config import ConfigError, SamplerConfig
from textdiffusion.core.detokenize import decode_text
from textdiffusion.core.labels import check_guidance, label_token
from textdiffusion.core.templates import MASK_SPAN
from textdiffusion.errors import UsageError
from textdiffusion.pipelines.guidance import check_method, label_prefix, make_guider
from textdiffusion.serving.door import AccessLog, ApiKeyAuth
from textdiffusion.serving.engine import (
    ClientQueueFull,
    Engine,
    Job,
    JobSpec,
    QueueFull,
    default_max_length,
    model_positions,
)
from textdiffusion.serving.metrics import ServerMetrics
from textdiffusion.serving.schemas import CompletionRequest, GenerateRequest

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 8  # a request is an object of scalars and lists of strings: two levels


class APIError(Exception):
    """A request the server refuses: status, message, and the field and value it is about."""

    def __init__(self, status: int, message: str, field: str | None = None, value: Any = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.value, self.kind = status, message, field, value, kind
        self.headers = headers


def error_response(status: int, message: str, field: str | None = None, value: Any = None,
                   kind: str = "invalid_request_error", headers: dict | None = None,
                   details: list | None = None) -> JSONResponse:
    """OpenAI's error shape (message, type, param) plus the offending value, always encodable: the whole
    body goes through ``_jsonable``, since message, field and value may all echo what the client sent."""
    body = {"error": {"message": message, "type": kind, "param": field, "value": value, "code": status}}
    if details is not None:
        body["error"]["details"] = details
    return JSONResponse(_jsonable(body), status_code=status, headers=headers)


def _jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as strict UTF-8 JSON can carry it: NaN and the infinities by their names ("NaN",
    "Infinity", "-Infinity"), text with lone surrogates escaped ("\\ud800"), anything else as its repr. An
    error that echoes a client's value must never itself fail to encode (a 500 in place of the 4xx)."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
        return value
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        pass
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if depth < 8 and isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if depth < 8 and isinstance(value, dict):
        return {_jsonable(str(k), depth + 1): _jsonable(v, depth + 1) for k, v in value.items()}
    return _jsonable(_short(repr(value)), depth + 1)  # a repr escapes surrogates, but a custom one need not


def check_json_body(raw: bytes, content_type: str | None) -> None:
    """Refuse, naming the field, a body that is not strict JSON. Python's ``json`` (which FastAPI parses
    with) accepts NaN, Infinity, numbers that overflow to infinity (1e999) and lone surrogates ("\\ud800"),
    none of them JSON's; they would reach the sampler, the tokenizer (a 500) or an error that cannot be
    encoded (another 500). FastAPI parses the same bytes afterwards, so whatever it sees has passed here."""
    if content_type is None or not _is_json(content_type):  # none: FastAPI reads it as JSON in some versions only
        got = "none" if content_type is None else repr(content_type)
        raise APIError(415, f"the body must be JSON (Content-Type: application/json), got Content-Type {got}.",
                       "content-type", content_type)
    try:
        data = json.loads(raw.decode("utf-8-sig"))  # strict UTF-8: FastAPI's own decoding lets surrogates pass
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}).",
                       "body", None) from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the body is not valid JSON: {e.msg} (at character {e.pos}).", "body", None) from None
    except RecursionError:
        raise APIError(400, "the body is nested too deeply to parse (a request is a flat JSON object).",
                       "body", None) from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise APIError(400, f"the body cannot be parsed ({str(e).split(':')[0]}).", "body", None) from None
    stack = [((), data)]  # (path, value), in document order: the first bad value is the one named
    while stack:
        path, value = stack.pop()
        field = ".".join(map(str, path)) or "body"
        if len(path) > MAX_JSON_DEPTH:
            raise APIError(400, f"`{path[0]}` is nested more than {MAX_JSON_DEPTH} levels deep (a request is a flat "
                                "JSON object).", str(path[0]), None)
        if isinstance(value, float) and not math.isfinite(value):
            raise APIError(422, f"`{field}` must be a finite number, got {_jsonable(value)}.", field, value)
        if isinstance(value, str) and (bad := _lone_surrogate(value)) is not None:
            raise APIError(422, f"`{field}` is not valid Unicode: a lone surrogate ({bad}); send text as "
                                "UTF-8, and a surrogate escape only as half of a pair.", field, _short(value))
        if isinstance(value, dict):
            for key in value:
                if (bad := _lone_surrogate(key)) is not None:
                    name = ".".join(map(str, path + (key,)))  # error_response escapes it
                    raise APIError(422, f"the field name `{name}` is not valid Unicode: a lone surrogate ({bad}).",
                                   name, None)
            stack.extend(reversed([(path + (k,), v) for k, v in value.items()]))
        elif isinstance(value, list):
            stack.extend(reversed([(path + (i,), v) for i, v in enumerate(value)]))


def _is_json(content_type: str) -> bool:
    """The media types FastAPI parses as JSON: application/json and application/*+json."""
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _lone_surrogate(text: str) -> str | None:
    """Where ``text`` fails to be UTF-8 (``\\ud800 at character 3``), or None when it is valid Unicode."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"\\u{ord(text[e.start]):04x} at character {e.start}"


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is a 413 before anything parses it (declared length or
    counted, for chunked bodies); a body within the limit is read once, checked to be strict JSON
    (``check_json_body``: every POST route here takes JSON) and replayed to the app."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            value = int(length) if length.isdigit() else length.decode("latin-1")
            return await self._refuse(value, scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away while sending
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(size, scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        if body:  # an empty body is FastAPI's to refuse (a missing body is a 422 naming it)
            content_type = dict(scope["headers"]).get(b"content-type")
            try:
                check_json_body(body, None if content_type is None else content_type.decode("latin-1"))
            except APIError as e:
                return await error_response(e.status, e.message, e.field, e.value)(scope, receive, send)

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices, as usual

        return await self.app(scope, replay, send)

    async def _refuse(self, value, scope, receive, send):
        response = error_response(413, f"the request body is larger than {self.limit} bytes.", "body", value)
        await response(scope, receive, send)


def create_app(engine: Engine, model_id: str, metrics: ServerMetrics | None = None, api_keys: dict | None = None,
               public_metrics: bool = False, cors_origins: list[str] | None = None,
               access_log: AccessLog | None = None) -> FastAPI:
    """The app around a started engine (the caller owns the engine's lifecycle). ``api_keys`` ({key: name}):
    every route but /healthz and the page's files needs one (serving/door.py); ``cors_origins``: the origins a
    browser page elsewhere may call from (none by default); ``access_log``: one JSON line per request."""
    app = FastAPI(title="textdiffusion", version="0.1.0", docs_url="/docs", redoc_url=None)
    gen = engine.generator
    positions = model_positions(gen)
    metrics = metrics or ServerMetrics(engine)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(BodyLimit)
    app.add_middleware(ApiKeyAuth, keys=api_keys or {}, public_metrics=public_metrics)
    if cors_origins:  # outermost: a 401 or 413 still carries the CORS headers the browser needs to read it
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- errors: every refusal names its field and value -------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.field, e.value, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg')} "
                                       f"(at character {first.get('ctx', {}).get('position', '?')}).", "body", None)
        value = first.get("input")
        if first.get("type") == "missing":
            value = None
        message = f"`{field}`: {first.get('msg')}" + ("" if first.get("type") == "missing" else f", got {_short(value)}")
        details = [{"field": ".".join(str(p) for p in d.get("loc", ()) if p != "body"), "message": d.get("msg"),
                    "value": _jsonable(d.get("input"))} for d in e.errors()]
        return error_response(422, message + ".", field, value, details=details)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            metrics.count(request.url.path, response.status_code)
            streamed = response.headers.get("content-type", "").startswith("text/event-stream")
            if access_log is not None and not streamed:  # a stream is logged when it ends (_logged)
                job = getattr(request.state, "job", None)
                access_log.write(**_log_fields(request, job, response.status_code, started))
        return response

    # -- small endpoints ---------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": model_id, **engine.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "created": int(metrics.started), "owned_by": "textdiffusion",
            "max_length": default_max_length(gen), "positions": positions, "max_batch": engine.max_batch,
            "defaults": {f: getattr(gen.config.generation, f) for f in ("steps", "strategy", "sampling", "temperature",
                                                                  "top_k", "top_p")},
            "labels": _labels(gen, engine.guide), "guidance": _methods(gen, engine.guide)}]}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # -- generation --------------------------------------------------------------------------------
    async def submit(spec: JobSpec, field: str, text: str, request: Request) -> Job:
        """Queue a job built from the request's ``field`` (its text, ``text``), on behalf of the request's client."""
        loop = asyncio.get_running_loop()
        spec.client = getattr(request.state, "client", "local")
        request.state.prompt = text
        try:
            job = await run_in_threadpool(engine.submit, spec, loop)  # tokenising is off the event loop
            request.state.job = job
            return job
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e} Retry shortly.", kind="server_busy",
                           headers={"Retry-After": "1"}) from None
        except ClientQueueFull as e:
            raise APIError(429, f"too many requests: {e} Retry when one has finished.", kind="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except UsageError as e:
            raise _refusal(e, field, text) from None
        except ValueError as e:  # no field of its own: the job's text is what it was built from
            raise APIError(422, f"`{field}`: {e}", field, _short(text)) from None

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest, request: Request):
        sampler = _sampler_config(gen, body.sampler_kwargs())
        max_length = body.max_length or default_max_length(gen)
        if max_length > positions:
            raise APIError(422, f"`max_length` must be <= {positions} (the model's positions), got {max_length}.",
                           "max_length", max_length)
        if body.template is not None:
            field, text = "template", body.template
            _check_spans(text, positions)
            templates = [text] * body.n
        else:
            field, text = "prompt", body.prompt
            try:
                templates = [gen.prompt_template(text, max_length)] * body.n
            except UsageError as e:
                raise _refusal(e, field, text) from None
        try:
            guider, head = _guidance(body, engine.guide, gen, model_id)
            if head:  # the label's token opens the row (a labelled model), never generated again
                row = head + text if body.template is not None else gen.prompt_template(head + text, max_length)
                templates = [row] * body.n
            check_guidance(body.cfg_scale, "`cfg_scale`", templates[:1], gen.config.labels)  # as generate's CLI
        except UsageError as e:
            raise APIError(422, str(e), e.field, e.value) from None
        suppress = list(body.suppress_tokens) + ([label_token(c) for c in gen.config.labels] if head else [])
        spec = JobSpec(templates=templates, sampler=sampler, seed=body.seed, cfg_scale=body.cfg_scale,
                       suppress_tokens=suppress, stop_at_eos=body.stop_at_eos, max_length=max_length,
                       stream=body.stream, guider=guider, timeout=body.timeout)
        if body.suppress_tokens:
            try:
                gen.suppress_ids(body.suppress_tokens)
            except UsageError as e:
                raise _refusal(e, "suppress_tokens", body.suppress_tokens) from None  # names the token
        job = await submit(spec, field, text, request)
        if body.stream:
            return StreamingResponse(_logged(_sse(job), request, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await _wait(job, request)
        return {"id": f"gen-{job.id}", "model": model_id, **result}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.model is not None and body.model != model_id:
            raise APIError(404, f"`model` {body.model!r} is not served here (this server serves {model_id!r}).",
                           "model", body.model, kind="model_not_found")
        n_prompt = len(gen.tokenizer(body.prompt, add_special_tokens=False)["input_ids"])
        room = positions - n_prompt - (gen.cls_id is not None) - (gen.sep_id is not None)
        if body.max_tokens > room:
            raise APIError(422, f"`max_tokens` must be <= {max(room, 0)} for this {n_prompt}-token prompt "
                                f"(the model has {positions} positions), got {body.max_tokens}.",
                           "max_tokens", body.max_tokens)
        sampler = _sampler_config(gen, body.sampler_kwargs())
        seed = body.seed if body.seed is not None else random.randrange(2 ** 31)
        spec = JobSpec(templates=[f"{body.prompt}<mask:{body.max_tokens}>"] * body.n, sampler=sampler, seed=seed,
                       stream=body.stream, timeout=body.timeout)
        job = await submit(spec, "prompt", body.prompt, request)
        created = int(time.time())
        head = {"id": f"cmpl-{job.id}", "object": "text_completion", "created": created, "model": model_id}
        if body.stream:
            return StreamingResponse(_logged(_completion_stream(job, head), request, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        await _wait(job, request)
        choices = [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(_continuations(job))]
        tokens = int(job.state.editable.sum())
        return {**head, "choices": choices,
                "usage": {"prompt_tokens": n_prompt * body.n, "completion_tokens": tokens,
                          "total_tokens": n_prompt * body.n + tokens}}

    # -- relaying the engine's events --------------------------------------------------------------
    async def _wait(job: Job, request: Request) -> dict:
        """The final result; a client that hangs up cancels its job (its rows leave at the next step)."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        raise APIError(499, "client closed the request") from None
                    continue
                if event["event"] == "done":
                    return {k: v for k, v in job.result.items()}
                if event["event"] == "error":
                    status = event.get("status", 500)
                    raise APIError(status, event["message"], kind="timeout" if status == 504 else "server_error")
        except asyncio.CancelledError:
            job.cancel()
            raise

    async def _sse(job: Job):
        try:
            while True:
                event = await job.events.get()
                yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
                if event["event"] in ("done", "error"):
                    return
        finally:
            job.cancel()  # no-op when done; frees the rows of a client that went away

    async def _completion_stream(job: Job, head: dict):
        """OpenAI chunks: each choice's text grows as its committed prefix grows (committed tokens never
        change here: completions use no re-masking), the rest when it finishes, then [DONE]."""
        sent = [""] * len(job.spec.templates)
        try:
            while True:
                event = await job.events.get()
                if event["event"] == "error":
                    kind = "timeout" if event.get("status") == 504 else "server_error"
                    error = {"message": event["message"], "type": kind, "code": event.get("status", 500)}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                done = event["event"] == "done"
                finals = _continuations(job) if done else None
                for i, row in enumerate(event["rows"]):
                    text, reason = finals[i] if done else (_prefix_text(gen, row), None)
                    if text is None or not text.startswith(sent[i]):
                        continue
                    delta, sent[i] = text[len(sent[i]):], text
                    if delta or done:
                        chunk = {**head, "choices": [{"text": delta, "index": i, "logprobs": None, "finish_reason": reason}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                if done:
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancel()

    async def _logged(events, request: Request, job: Job):
        """A stream's events, then its access-log line (its status: 200, or the error's when it ended in one)."""
        started = job.submitted
        try:
            async for chunk in events:
                yield chunk
        finally:
            if access_log is not None:
                status = (job.result or {}).get("status", 200 if job.result else 499)
                access_log.write(**_log_fields(request, job, status, started))

    def _continuations(job: Job) -> list[tuple[str, str]]:
        x, editable = engine.state_cpu(job)
        return [_continuation(gen, row, ed) for row, ed in zip(x, editable)]

    return app


def _log_fields(request: Request, job: Job | None, status: int, started: float) -> dict:
    """The access-log fields of one request (serving/door.AccessLog decides whether the texts are kept)."""
    result = (job.result or {}) if job is not None else {}
    return dict(request_id=f"{job.id}" if job is not None else None,
                client=getattr(request.state, "client", "?"), route=request.url.path, status=status, started=started,
                tokens=result.get("tokens"), model_calls=result.get("model_calls"),
                prompt=getattr(request.state, "prompt", None), texts=result.get("texts"))


def _labels(gen, guide) -> list[str]:
    """The labels a request may ask for: the checkpoint's (its label token), else the guide's."""
    return list(gen.config.labels or (guide.labels if guide is not None else []))


def _methods(gen, guide) -> list[str]:
    """The guidance methods this server offers for a label."""
    return (["cfg"] if gen.config.labels else []) + (["classifier", "smc"] if guide is not None else [])


def _guidance(body: GenerateRequest, guide, gen, model_id: str):
    """(guider or None, the label's token text or "") for a request; a UsageError names the field."""
    guidance = body.guidance
    if guidance is None and body.label is not None and not gen.config.labels and guide is not None:
        guidance = "classifier"  # an unlabelled model steers by its guide only
    check_method(guidance, body.cfg_scale, guide if guidance in ("classifier", "smc") else None, body.label,
                 body.guidance_scale, body.particles, flag_style="`")
    if guidance in ("classifier", "smc") and guide is None:  # check_method said so; never reached
        raise UsageError("`guidance` needs a guide.", field="guidance", value=guidance)
    steer = guide if guidance in ("classifier", "smc") else None
    head = label_prefix(gen.config.labels, body.label, steer, model_id, flag="`label`")
    return make_guider(guidance, steer, body.label, body.guidance_scale, body.particles, body.seed), head


def _sampler_config(gen, kwargs: dict) -> SamplerConfig:
    """The checkpoint's generation defaults with the request's own settings on top."""
    import dataclasses

    try:
        return dataclasses.replace(gen.config.generation, **kwargs)
    except (ConfigError, UsageError) as e:  # a setting out of range, or a combination the sampler refuses
        raise APIError(422, str(e), e.field, e.value) from None


def _check_spans(template: str, positions: int) -> None:
    """Refuse a template whose spans alone exceed the model before anything is allocated for it."""
    total = sum(int(m.group(1) or 1) for m in MASK_SPAN.finditer(template))
    if total > positions:
        raise APIError(422, f"`template`: its spans have {total} masked positions, more than the model's {positions}.",
                       "template", _short(template))


def _refusal(e: UsageError, field: str, value: Any) -> APIError:
    """A 422 naming the field the error carries. An error about the text (or none named) is about the
    request's ``field``, whose value is ``value``: a prompt reaches the generator as a template."""
    if e.field not in (None, "template", "prompt"):
        field, value = e.field, e.value
    return APIError(422, f"`{field}`: {e}", field, _short(value))


def _short(value: Any, limit: int = 200) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "…"
    return value


def _continuation(gen, row, editable) -> tuple[str, str]:
    """The generated text of one row (its masked span only) and why it ended: ``stop`` at end of text."""
    ids = row[editable]  # [m] the continuation's tokens
    eos = (ids == gen.sep_id).nonzero()
    if len(eos):
        return decode_text(gen.tokenizer, ids[: int(eos[0])].tolist()), "stop"
    return decode_text(gen.tokenizer, ids.tolist()), "length"


def _prefix_text(gen, row: dict) -> str | None:
    """Text of the committed prefix of a streamed row's continuation (None while it ends mid-character)."""
    ids = [i for i, e in zip(row["ids"], row["editable"]) if e]  # display path: one row of <= max_tokens ids
    masked = [m for m, e in zip(row["masked"], row["editable"]) if e]
    cut = masked.index(True) if True in masked else len(ids)
    prefix = ids[:cut]
    if gen.sep_id in prefix:
        prefix = prefix[: prefix.index(gen.sep_id)]
    text = decode_text(gen.tokenizer, prefix)
    return None if text.endswith("\ufffd") else text
