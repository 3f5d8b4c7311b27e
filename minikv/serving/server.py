"""An OpenAI-compatible HTTP server over the engine (``minikv serve``; needs the extra ``serve``).

    $ minikv serve --port 8000
    >>> from openai import OpenAI
    >>> client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    >>> client.completions.create(model="tiny-fortunes", prompt="Once upon", max_tokens=20, temperature=0)

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the
checkpoint's chat template), with ``"stream": true`` as server-sent events ending in
``data: [DONE]``. Request fields: ``max_tokens``, ``temperature``, ``top_p``, ``n``, ``stop`` (strings),
``seed``, ``stream_options.include_usage``.

Two threads: the event loop (Starlette on uvicorn) parses requests and writes responses; the
engine thread runs ``engine.step()`` whenever there is work. They meet in two places only: an inbox
of commands (add a request, abort one) that the engine thread drains between steps, and each
request's ``asyncio.Queue`` that the engine thread fills through ``loop.call_soon_threadsafe``. The
event loop never waits on a forward, and the engine is only ever touched by its own thread.

A bad request gets a 4xx with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``;
a client that goes away mid-stream aborts its request, which gives its blocks back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import BackendUnavailableError, MinikvError, SequenceTooLongError
from .engine import Engine, RequestOutput

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError:  # pragma: no cover - the import error is raised when a server is built
    Starlette = None

MAX_N = 8
MAX_STOP = 4


# ------------------------------------------------------------------ errors in OpenAI's shape

class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> "JSONResponse":
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param, code)


# ------------------------------------------------------------------ the engine thread

class AsyncEngine:
    """Runs an Engine in a background thread; the event loop talks to it through an inbox."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._outboxes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: Optional[threading.Thread] = None
        self.idle = threading.Event()         # set while the engine has nothing to do (tests wait on it)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="minikv-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def add(self, prompt_ids: list[int], **options) -> tuple[str, asyncio.Queue]:
        """Queue a request; returns its id and the queue its RequestOutputs will arrive on.
        Raises the engine's MinikvError (checked in the engine thread) if the request is refused."""
        loop = asyncio.get_running_loop()
        request_id = f"req-{uuid.uuid4().hex}"
        outbox: asyncio.Queue = asyncio.Queue()
        accepted: asyncio.Future = loop.create_future()
        self._outboxes[request_id] = (loop, outbox)
        self._inbox.put(("add", request_id, prompt_ids, options, accepted, loop))
        self._wake.set()
        try:
            await accepted
        except BaseException:
            self._outboxes.pop(request_id, None)
            raise
        return request_id, outbox

    def abort(self, request_id: str, index: Optional[int] = None) -> None:
        """Stop the request (index None: the client is gone) or one of its answers (a stop string)."""
        if index is None:
            self._outboxes.pop(request_id, None)
        self._inbox.put(("abort", request_id, index))
        self._wake.set()

    def finished(self, request_id: str) -> None:
        self._outboxes.pop(request_id, None)

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "abort":
                self.engine.abort(command[1], command[2])
                continue
            _, request_id, prompt_ids, options, accepted, loop = command
            try:
                self.engine.add_request(prompt_ids, request_id=request_id, **options)
            except MinikvError as exc:
                loop.call_soon_threadsafe(_settle, accepted, exc)
            else:
                loop.call_soon_threadsafe(_settle, accepted, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self.idle.set()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            self.idle.clear()
            try:
                outputs = self.engine.step()
            except Exception as exc:          # a bug, not a bad request: fail every request in flight
                outputs = []
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    self._deliver(request_id, exc)
            for out in outputs:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item) -> None:
        target = self._outboxes.get(request_id)
        if target is not None:
            loop, outbox = target
            loop.call_soon_threadsafe(outbox.put_nowait, item)


def _settle(future: asyncio.Future, error: Optional[BaseException]) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


# ------------------------------------------------------------------ request bodies

@dataclass
class Params:
    max_tokens: int
    temperature: float
    top_p: Optional[float]
    n: int
    stop: list[str]
    seed: Optional[int]
    stream: bool
    include_usage: bool


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _params(body: dict, default_max_tokens: int) -> Params:
    """Every common field of a completions / chat body, checked; APIError(400) names the bad one."""
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", default_max_tokens))
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not _is_int(max_tokens) or max_tokens < 1:
        raise _bad(f"max_tokens={max_tokens!r} must be an integer >= 1", "max_tokens")
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise _bad(f"temperature={temperature!r} must be a number between 0 and 2", "temperature")
    top_p = body.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise _bad(f"top_p={top_p!r} must be a number in (0, 1]", "top_p")
    n = body.get("n", 1)
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise _bad(f"n={n!r} must be an integer between 1 and {MAX_N}", "n")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise _bad(f"stop={body.get('stop')!r} must be a non-empty string or a list of up to {MAX_STOP} of them",
                   "stop")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise _bad(f"seed={seed!r} must be a non-negative integer", "seed")
    stream = body.get("stream", False)
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise _bad(f"stream={stream!r} must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    return Params(max_tokens, float(temperature), None if top_p is None else float(top_p), n, stop, seed, stream,
                  bool(options.get("include_usage", False)))


class _Choice:
    """One answer's text as it grows: decodes the tokens, holds back what may become a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = ""                 # decoded so far (complete characters only), before any stop string
        self.sent = 0                  # characters of text already streamed
        self.finish_reason: Optional[str] = None

    def add(self, out: RequestOutput) -> None:
        self.tokens += out.new_token_ids
        text = self.tokenizer.decode(self.tokens) if self.tokenizer else ""
        if not out.finished and text.endswith("\ufffd"):
            return                     # an incomplete multi-byte character: wait for its last byte
        for stop in self.stop:
            at = text.find(stop)
            if at >= 0:
                self.text, self.finish_reason = text[:at], "stop"
                return
        self.text = text
        if out.finished:
            self.finish_reason = "length" if out.finish_reason == "length" else "stop"

    def delta(self) -> str:
        """The text that can be sent now: all of it once finished, else all but what could still
        turn out to be the start of a stop string."""
        end = len(self.text)
        if self.finish_reason is None and self.stop:
            end = max(self.sent, end - (max(len(s) for s in self.stop) - 1))
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


# ------------------------------------------------------------------ the app

def create_app(model, model_name: Optional[str] = None, *, default_max_tokens: int = 16, **engine_options):
    """The Starlette app serving ``model``; ``engine_options`` go to ``Engine`` (num_blocks, block_size, ...).
    ``app.state.engine`` is the AsyncEngine (its ``.engine`` the Engine, for tests and stats)."""
    if Starlette is None:
        raise BackendUnavailableError("the server needs Starlette and uvicorn: pip install 'minikv[serve]'")
    name = model_name or (model.source.name if getattr(model, "source", None) else "minikv")
    async_engine = AsyncEngine(Engine(model, **engine_options))
    created = int(time.time())
    tokenizer = model.tokenizer

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _bad(f"the request body is not valid JSON: {exc}", code="invalid_json")
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        requested = body.get("model")
        if not isinstance(requested, str):
            raise _bad("model must be a string naming the model (GET /v1/models lists it)", "model")
        if requested != name:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves {name!r}", "model",
                           "model_not_found")
        return body

    def prompt_ids(prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]          # a batch of one
        if isinstance(prompt, str):
            if tokenizer is None:
                raise _bad("this model has no tokenizer; send the prompt as a list of token ids", "prompt")
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            ids = prompt
        else:
            raise _bad("prompt must be a non-empty string or a list of token ids (one prompt per request)",
                       "prompt")
        if not ids:
            raise _bad("prompt is empty; give at least one token", "prompt")
        return ids

    async def submit(ids: list[int], params: Params) -> tuple[str, asyncio.Queue]:
        options = dict(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                       n=params.n, seed=params.seed)
        try:
            return await async_engine.add(ids, **options)
        except SequenceTooLongError as exc:
            raise _bad(str(exc), "max_tokens", "context_length_exceeded") from None
        except MinikvError as exc:
            raise _bad(str(exc)) from None

    async def answers(request_id: str, outbox: asyncio.Queue, params: Params):
        """Yield (choice index, choice) each time an answer grows, until every answer is finished.
        Stop strings end an answer early (the engine is told to stop the whole request once all
        answers are done)."""
        choices = [_Choice(tokenizer, params.stop) for _ in range(params.n)]
        try:
            while any(c.finish_reason is None for c in choices):
                out = await outbox.get()
                if isinstance(out, Exception):
                    raise APIError(500, f"the engine failed: {type(out).__name__}: {out}", kind="server_error")
                choice = choices[out.index]
                if choice.finish_reason is None:
                    choice.add(out)
                    if choice.finish_reason is not None and not out.finished:
                        async_engine.abort(request_id, out.index)     # a stop string: stop computing it
                    yield out.index, choice, out
        finally:
            # Done (or the client went away, or a stop string ended it): free the blocks now.
            async_engine.abort(request_id)

    def usage(prompt_tokens: int, choices: list) -> dict:
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def complete(request: Request, ids: list[int], params: Params, chat: bool):
        request_id, outbox = await submit(ids, params)
        response_id = ("chatcmpl-" if chat else "cmpl-") + request_id.split("-", 1)[1]
        obj = "chat.completion" if chat else "text_completion"
        if not params.stream:
            choices = [None] * params.n
            async for index, choice, _ in answers(request_id, outbox, params):
                choices[index] = choice
            body_choices = []
            for i, c in enumerate(choices):
                if chat:
                    body_choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                                         "logprobs": None, "finish_reason": c.finish_reason})
                else:
                    body_choices.append({"index": i, "text": c.text, "logprobs": None,
                                         "finish_reason": c.finish_reason})
            return JSONResponse({"id": response_id, "object": obj, "created": int(time.time()), "model": name,
                                 "choices": body_choices, "usage": usage(len(ids), choices)})

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: Optional[str], finish_reason: Optional[str], first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            payload = {"id": response_id, "object": chunk_obj, "created": int(time.time()), "model": name,
                       "choices": [choice]}
            if params.include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            all_choices = {}
            if chat:
                for i in range(params.n):
                    yield chunk(i, None, None, first=True)
            async for index, choice, out in answers(request_id, outbox, params):
                all_choices[index] = choice
                text = choice.delta()
                if text:
                    yield chunk(index, text, None)
                if choice.finish_reason is not None:
                    yield chunk(index, None, choice.finish_reason)
            if params.include_usage:
                payload = {"id": response_id, "object": chunk_obj, "created": int(time.time()), "model": name,
                           "choices": [], "usage": usage(len(ids), list(all_choices.values()))}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def completions(request: Request):
        try:
            body = await read_body(request)
            params = _params(body, default_max_tokens)
            if "prompt" not in body:
                raise _bad("prompt is required", "prompt")
            ids = prompt_ids(body["prompt"])
            return await complete(request, ids, params, chat=False)
        except APIError as exc:
            return exc.response()

    async def chat_completions(request: Request):
        try:
            body = await read_body(request)
            params = _params(body, default_max_tokens)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
                raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
            template = getattr(model, "apply_chat_template", None)
            if template is None:
                raise _bad(f"the model {name!r} has no chat template; use /v1/completions", "messages",
                           "no_chat_template")
            try:
                ids = list(template(messages, add_generation_prompt=True))
            except MinikvError as exc:
                raise _bad(f"the chat template could not render these messages: {exc}", "messages",
                           "no_chat_template") from None
            return await complete(request, ids, params, chat=True)
        except APIError as exc:
            return exc.response()

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "minikv"}]})

    async def http_error(request: Request, exc: HTTPException):
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
                        ).response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async_engine.start()
        try:
            yield
        finally:
            async_engine.stop()

    app = Starlette(
        routes=[Route("/v1/models", models, methods=["GET"]),
                Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/chat/completions", chat_completions, methods=["POST"])],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.engine = async_engine
    app.state.model_name = name
    return app


def serve(model, host: str = "127.0.0.1", port: int = 8000, model_name: Optional[str] = None,
          log_level: str = "info", **engine_options) -> None:
    """Serve ``model`` over HTTP with OpenAI's API until interrupted (what ``minikv serve`` runs).

    ``serve(minikv.load("path/to/folder"), port=8000)``, then any OpenAI client with
    ``base_url="http://127.0.0.1:8000/v1"``: ``/v1/models``, ``/v1/completions`` and
    ``/v1/chat/completions`` (the checkpoint's chat template), streamed (server-sent events) or not.

    model:          a ``Transformer`` (from ``minikv.load``).
    host, port:     where to listen (default 127.0.0.1:8000: this machine only).
    model_name:     the model id clients ask for (default: the checkpoint folder's name).
    log_level:      uvicorn's ("info").
    engine_options: for ``minikv.serving.Engine``: ``num_blocks`` (K/V pool size; default 1024 or one
                    full-length sequence), ``block_size`` (16), ``max_num_tokens`` (the token budget per
                    step, 256), ``max_num_seqs`` (64), ``prefix_caching`` (True), ``cache_dtype``.

    Requests are batched continuously (each step runs every live request's next tokens in one forward)
    and share cached prompt prefixes; a greedy request gets exactly the tokens ``model.generate`` gives
    it alone (tests/test_serving.py).
    Needs the ``serve`` extra (Starlette, uvicorn): ``BackendUnavailableError`` otherwise.
    """
    try:
        import uvicorn
    except ImportError:
        raise BackendUnavailableError("the server needs Starlette and uvicorn: pip install 'minikv[serve]'") from None
    app = create_app(model, model_name, **engine_options)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
