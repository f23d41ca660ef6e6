"""HTTP routes: POST /retrieve, GET /health, /ready, /stats, POST /admin/reload.

The body of /retrieve is read and parsed here rather than by FastAPI's automatic validation, so
that every refusal has one shape, {"detail": message, "field": name}, and an oversized body is
refused while it streams in. What the JSON parser itself would choke on is refused first, as a
4xx: nesting deeper than MAX_DEPTH (json recurses per level: 20k nested arrays fit in 64 KB and
raise RecursionError), integers longer than MAX_INT_DIGITS (Python refuses to convert more than
4300 digits), NaN / Infinity (not JSON); lone surrogates are refused per field (schema.py).
"""
from __future__ import annotations

import json
import re
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from components.serving.schema import RequestError, RetrieveRequest, check_request
from components.serving.service import Service
from components.serving.versions import VersionChanged

MAX_DEPTH = 8            # a request is an object of lists of strings (depth 2)
MAX_INT_DIGITS = 20      # k and beam are small; a longer number is refused before it is converted
_ESCAPE = re.compile(r"\\.", re.DOTALL)          # \" and \\ inside strings: neither ends a string
_NOT_STRUCTURE = re.compile(r'[^"\[\]{}]')


def refusal(err: RequestError) -> JSONResponse:
    return JSONResponse({"detail": f"{err.field}: {err.message}", "field": err.field}, status_code=err.status)


def validation_error(exc: ValidationError) -> RequestError:
    """The first pydantic error as a RequestError naming its field (history[2], k, ...)."""
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"]]
    field = loc[0] + "".join(f"[{p}]" for p in loc[1:]) if loc else "body"
    if first["type"] == "extra_forbidden":
        return RequestError(field, "unknown field (allowed: " + ", ".join(RetrieveRequest.model_fields) + ")")
    if first["type"] == "model_type":
        return RequestError("body", "must be a JSON object")
    return RequestError(field, first["msg"])


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON text (brackets inside strings do not count). Linear
    time, no recursion and no backtracking, so it runs before the parser on any body that fits
    max_body_bytes: escapes go first, then quotes toggle in / out of a string."""
    marks = np.frombuffer(_NOT_STRUCTURE.sub("", _ESCAPE.sub("", text)).encode("ascii"), np.uint8)
    quote = marks == ord('"')
    outside = (np.cumsum(quote) % 2 == 0) & ~quote
    step = np.where((marks == ord("[")) | (marks == ord("{")), 1, np.where(quote, 0, -1)) * outside
    return int(np.cumsum(step).max(initial=0))


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError("body", f"a number with {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(digits)


def _constant(name: str) -> float:
    raise RequestError("body", f"malformed JSON ({name} is not a JSON value)", 400)


def parse_json(body: bytes) -> object:
    """The body's JSON value; RequestError (4xx) for anything the parser would fail on or choke on."""
    try:
        text = body.decode(json.detect_encoding(body))   # json.loads' own choice of UTF-8 / 16 / 32
    except UnicodeDecodeError as exc:
        raise RequestError("body", f"malformed JSON ({exc})", 400) from None
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise RequestError("body", f"JSON nested {depth} levels deep (at most {MAX_DEPTH})", 400)
    try:
        return json.loads(text, parse_int=_int, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise RequestError("body", f"malformed JSON ({exc})", 400) from None
    except RecursionError:   # not reached while MAX_DEPTH holds; never a 500 if it is raised
        raise RequestError("body", "JSON nested too deeply", 400) from None


async def read_body(request: Request, limit: int) -> RetrieveRequest:
    """The request body as a RetrieveRequest; too large, malformed JSON or wrong fields raise RequestError."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError("body", f"larger than {limit} bytes", 413)
    try:
        return RetrieveRequest.model_validate(parse_json(bytes(body)))
    except ValidationError as exc:
        raise validation_error(exc) from None


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="sa2crq retrieval", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        body = {"ready": service.ready, "versions": service.versions(), "errors": service.errors()}
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/stats")
    async def stats() -> dict:
        return {"versions": service.versions(), **service.batcher.stats.as_dict()}

    @app.post("/retrieve")
    async def retrieve(request: Request) -> JSONResponse:
        try:
            job = check_request(await read_body(request, service.settings.max_body_bytes), service.settings)
            if not service.ready:
                return JSONResponse({"detail": "model not loaded yet (see /ready)"}, status_code=503)
            answer = await service.batcher.submit(job)
        except RequestError as err:
            return refusal(err)
        except Exception as exc:   # noqa: BLE001 - one request fails, the service goes on
            return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)
        return JSONResponse({"request_id": answer.request_id, "variant": answer.variant, "version": answer.version,
                             "k": answer.k, "beam": answer.beam, "items": answer.items})

    @app.post("/admin/reload")
    async def reload(force: bool = False) -> JSONResponse:
        try:
            return JSONResponse(await service.reload(force))
        except (VersionChanged, FileNotFoundError) as exc:
            return JSONResponse({"detail": f"not reloaded, still serving {service.versions()}: {exc}"},
                                status_code=409)
        except Exception as exc:   # noqa: BLE001 - e.g. a broken checkpoint: the old version stays
            return JSONResponse({"detail": f"reload failed, still serving {service.versions()}: "
                                           f"{type(exc).__name__}: {exc}"}, status_code=500)

    return app
