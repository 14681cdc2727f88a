"""The HTTP edges of the server: the body limit, OpenAI-shaped errors, the offline /docs, and
Server-Sent Events. serve/app.py imports `api`, the FastAPI object, from here and adds the
deployment's routes. (`app` is one thing only: serve/app.py's Serve application builder.)

Everything is registered on `api` at import, before serve/app.py's `@serve.ingress(api)`
freezes a copy of it for the replicas.
"""

import json
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.args import AppArgs
from serve.metrics import RequestLog
from serve.openai import APIError

SWAGGER_FILES = {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"}


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is a 413, checked while it is read (no
    Content-Length needed). A replica is one process, so the class attribute is the replica's
    setting (GPT2Server.__init__ sets it from AppArgs.body_limit)."""

    limit = AppArgs.model_fields["body_limit"].default

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > BodyLimit.limit:  # refused before reading
            response = _error(413, f"request body is {declared} bytes, over this server's "
                              f"limit of {BodyLimit.limit} bytes; send a shorter prompt",
                              code="request_too_large")
            return await response(scope, receive, send)
        await RequestBodyLimitResponder(self.app, BodyLimit.limit)(scope, receive, send)


api = FastAPI(title="gpt2-ray", description="GPT-2 on Ray Serve, OpenAI-compatible",
              # /docs below: Swagger UI's assets from the package, not a CDN; a body without
              # a content-type is read as JSON too
              docs_url=None, strict_content_type=False)
api.add_middleware(BodyLimit)
api.add_middleware(RequestLog)  # added last: outermost, so it sees 413s and 400s too


def _error(status: int, message: str, param: str | None = None,
           code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return APIError(status, message, param, code, kind).response()


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 as OpenAI's 400, naming the top-level field and what was wrong."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    if err["type"] == "json_invalid" or (loc == ["body"] and err["type"] == "missing"):
        return _error(400, "the body is not valid JSON; send a JSON object", code="invalid_json")
    if loc == ["body"]:  # not an object: JSON of another type, or a body labelled as a form
        return _error(400, "the body is not a JSON object; send one, with content-type: "
                      "application/json", code="invalid_json")
    param = loc[1] if len(loc) > 1 and loc[0] == "body" else None
    value = err.get("input")
    got = "" if param is None or isinstance(value, dict) else f" (got {value!r:.60})"
    return _error(400, f"{param or 'body'}: {err['msg']}{got}", param, "invalid_value")


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 413:
        return _error(413, f"request body is over this server's limit of {BodyLimit.limit} "
                      "bytes; send a shorter prompt", code="request_too_large")
    if exc.status_code == 400:  # FastAPI could not parse the body (not UTF-8, say)
        return _error(400, "the body is not valid JSON; send a JSON object", code="invalid_json")
    return _error(exc.status_code, str(exc.detail))


@api.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json", title="gpt2-ray API",
        swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png")


@api.get("/docs/assets/{name}", include_in_schema=False)
async def docs_asset(name: str) -> FileResponse:
    import swagger_ui_bundle  # here: the replica's own install, wherever it runs

    if name not in SWAGGER_FILES:
        raise APIError(404, f"no docs asset {name!r:.40}", code="not_found")
    return FileResponse(Path(swagger_ui_bundle.swagger_ui_path) / name)


def sse(data: dict | str) -> bytes:
    """One Server-Sent Event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def sse_events(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """Each chunk as an event, then [DONE]. The status line has gone out with the first
    chunk, so an error after it is an event of its own (OpenAI's error JSON), then [DONE]."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except Exception as e:
        error = e if isinstance(e, APIError) else APIError(
            500, f"decoding failed: {e}", type="server_error", code="internal_error")
        yield sse(error.body())
    yield sse("[DONE]")


