"""The OpenAI-compatible HTTP API over a :class:`~.scheduler.Scheduler` (Starlette, run by uvicorn).

    GET  /health                 {"status": "ok", "active": sequences in the scheduler}  (never needs the key)
    GET  /v1/models              the one served model
    POST /v1/completions         prompt -> text, streamed as server-sent events with "stream": true
    POST /v1/chat/completions    messages (the model's chat template) -> assistant message, or SSE chunks

Errors are OpenAI's JSON (400 bad field, 401 bad key, 404 unknown model or route, 503 queue
full). A client that goes away, streaming or not, cancels its sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import GenerationError, LlmarchError
from . import protocol as P
from .scheduler import Event, QueueFull, Scheduler


def error_response(e: P.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(scheduler: Scheduler, model_name: str, api_key: str | None = None) -> Starlette:
    """The ASGI app; it starts the scheduler's thread on startup and drains it on shutdown."""
    tokenizer = scheduler.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop, True)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name, "active": scheduler.active})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "llmarch"}]})

    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    async def handle(request: Request, chat: bool) -> Response:
        try:
            body = await read_json(request)
            P.check_model(body, model_name)
            if chat:
                prompt = chat_prompt(P.chat_messages(body))
                req = P.parse(body, prompt, scheduler.context, None)
            else:
                req = P.parse(body, P.completion_prompt(body, tokenizer), scheduler.context, 16)
            events: asyncio.Queue[Event] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            seq = scheduler.submit(req.prompt, req.config, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except P.APIError as e:
            return error_response(e)
        except QueueFull as e:
            return error_response(P.APIError(503, str(e), code="server_overloaded", kind="server_error"))
        except (GenerationError, LlmarchError) as e:
            return error_response(P.APIError(400, str(e)))
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        obj = "chat.completion" if chat else "text_completion"
        if req.stream:
            return StreamingResponse(sse(seq, events, rid, obj + (".chunk" if chat else ""), chat, req),
                                     media_type="text/event-stream")
        collector = asyncio.ensure_future(collect(events))
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({collector, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collector.done():  # the client went away (or the server is cancelling us): free the row
                collector.cancel()
                seq.cancel()
        if collector.cancelled():
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        text, last = collector.result()
        if last.finish_reason == "error":
            return error_response(P.APIError(500, last.text, kind="server_error"))
        choice = P.completion_choice("".join(text), last.finish_reason, chat, stream=False)
        return JSONResponse(P.envelope(rid, obj, model_name, [choice], P.usage(len(req.prompt), last.completion_tokens)))

    async def collect(events: asyncio.Queue) -> tuple[list[str], Event]:
        """Every piece of a non-streamed answer, and its last event."""
        text = []
        while (last := await events.get()).finish_reason is None:
            text.append(last.text)
        text.append(last.text)
        return text, last

    async def disconnected(request: Request) -> None:
        """Returns when the client hangs up (the body is read, so the next message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def sse(seq, events, rid: str, obj: str, chat: bool, req: P.Request) -> AsyncIterator[str]:
        def chunk(choices: list[dict], use: dict | None = None) -> str:
            return f"data: {json.dumps(P.envelope(rid, obj, model_name, choices, use))}\n\n"

        finished = False
        try:
            if chat:
                yield chunk([P.completion_choice("", None, chat, stream=True, first=True)])
            while True:
                ev = await events.get()
                finished = ev.finish_reason is not None
                if ev.finish_reason == "error":
                    yield f"data: {json.dumps(P.APIError(500, ev.text, kind='server_error').body())}\n\n"
                    break
                if ev.text or finished:
                    yield chunk([P.completion_choice(ev.text, ev.finish_reason, chat, stream=True)])
                if finished:
                    if req.include_usage:
                        yield chunk([], P.usage(len(req.prompt), ev.completion_tokens))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                seq.cancel()  # the client went away: free its row

    def chat_prompt(messages: list[dict]) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except LlmarchError as e:
            raise P.APIError(400, f"cannot apply the chat template: {e}", param="messages") from e
        return tokenizer.encode(text, add_special_tokens=False)  # the template writes its own BOS

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(P.APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={404: not_found, 405: not_found},
        lifespan=lifespan,
    )
    if api_key:
        app.add_middleware(_KeyCheck, api_key=api_key)
    return app


async def read_json(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise P.APIError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise P.APIError(400, "the request body must be a JSON object")
    return body


class _KeyCheck:
    """Every route but /health needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, b"Bearer " + self.key):
                e = P.APIError(401, "Incorrect API key provided; pass it as 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)
