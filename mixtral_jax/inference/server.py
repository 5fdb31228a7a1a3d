"""The HTTP front: OpenAI's API over the engine, a thin FastAPI shell.

    POST /v1/completions, /v1/chat/completions   (stream: server-sent events, `data: [DONE]`)
    GET  /v1/models, /health, /metrics            (metrics: Prometheus text)

`create_app(engine, tokenizer, name)` builds the app; with a bank of LoRA adapters in
the engine's model (`checkpoints.adapters.load_bank`), `adapters=` names them, each served as
a model of its own (a request's `model` picks it). The engine steps on a thread
of its own from startup to shutdown. A request becomes one engine request per
prompt, whose outputs come back through an asyncio queue; text, stop strings and
log-probabilities are `openai_api`'s. A client that goes away cancels its requests
(the slot is free the step after); a request that fails ends alone; shutdown stops
admitting and lets what is in flight finish (or cancels it after a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mixtral_jax.inference import openai_api as api
from mixtral_jax.inference.engine import Engine
from mixtral_jax.inference.grammar import Constraint, Grammars
from mixtral_jax.inference.metrics import ServingMetrics
from mixtral_jax.inference.requests import Output, QueueFull, RequestError
from mixtral_jax.inference.requests import Request as EngineRequest
from mixtral_jax.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class _Choice:
    """One prompt's engine request and its answer as the outputs arrive."""

    def __init__(self, index: int, prompt: list[int], prompt_text: str, answer: api.Answer):
        self.index, self.prompt, self.prompt_text, self.answer = index, prompt, prompt_text, answer
        self.request_id = ""


class _Call:
    """One HTTP request's engine requests; their outputs arrive on one queue."""

    def __init__(self, engine: Engine, metrics: ServingMetrics, body):
        self.engine, self.metrics, self.body = engine, metrics, body
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[_Choice, Output]] = asyncio.Queue()
        self.choices: list[_Choice] = []

    def submit(self, choice: _Choice, **params) -> None:
        timer = self.metrics.timer(len(choice.prompt))

        def on_output(output: Output) -> None:  # on the engine's thread
            timer.observe(output)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (choice, output))

        request = EngineRequest(choice.prompt, on_output=on_output, **params)
        choice.request_id = request.id
        try:
            self.engine.submit(request)
        except RequestError as e:
            # A chat's prompt is its messages.
            chat = isinstance(self.body, api.ChatRequest) and e.param == "prompt"
            raise api.ApiError(str(e), "messages" if chat else e.param) from None
        except QueueFull as e:
            raise api.ApiError(str(e), None, 429, "rate_limit_exceeded") from None
        self.choices.append(choice)

    async def outputs(self) -> AsyncIterator[tuple[_Choice, str]]:
        """(choice, text to send) as outputs arrive, until every choice is done. An
        answer a stop string ended is cancelled in the engine at once."""
        while not all(c.answer.done for c in self.choices):
            choice, output = await self.queue.get()
            if choice.answer.done:
                continue  # what came after a stop string
            if output.finish_reason == "error":
                raise api.ApiError(f"generation failed: {output.error}", None, 500, "server_error")
            if output.finish_reason == "cancelled":
                raise api.ApiError("the server is shutting down", None, 503, "server_error")
            piece = choice.answer.add(output)
            if choice.answer.stopped and not output.finished:
                self.engine.cancel(choice.request_id)
            yield choice, piece

    def cancel(self) -> None:
        """Cancels every choice not yet done (the client went away, or one failed)."""
        for choice in self.choices:
            if not choice.answer.done:
                self.engine.cancel(choice.request_id)


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    model_name: str,
    *,
    adapters: Sequence[str] = (),
    shutdown_timeout: float = 30.0,
) -> FastAPI:
    """The OpenAI-compatible app serving `engine`'s model as `model_name`, and the
    adapters of its model's bank (in order) as the models `adapters` names."""
    served = (model_name, *adapters)
    if len(adapters) != engine.model.config.lora_bank:
        raise ValueError(
            f"{len(adapters)} adapter names for a bank of {engine.model.config.lora_bank}"
        )
    if len(set(served)) != len(served):
        raise ValueError(f"the served models' names must differ: {served}")
    registry = CollectorRegistry()
    metrics = ServingMetrics(engine, registry)
    grammars = Grammars(tokenizer, engine.model.config.vocab_size)
    created = api.now()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop, shutdown_timeout)

    app = FastAPI(title="mixtral_jax", lifespan=lifespan)
    app.add_middleware(_InternalErrors)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(api.ApiError)
    async def api_error(request: Request, e: api.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return JSONResponse(_validation_error(e).body(), status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active_slots": engine.active_slots, "queue": engine.queue_depth}

    @app.get("/v1/models")
    async def models():
        listed = [{"id": model_name, "object": "model", "created": created}]
        listed += [
            {"id": name, "object": "model", "created": created, "parent": model_name}
            for name in adapters
        ]
        return {"object": "list", "data": [m | {"owned_by": "mixtral_jax"} for m in listed]}

    def adapter(body) -> dict:
        """The engine request's adapter for the model the body names (checked first)."""
        body.check(served)
        return {"adapter": None if body.model == model_name else adapters.index(body.model)}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request):
        chosen = adapter(body)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        choices = [
            _Choice(i, ids, text, api.Answer(tokenizer, body.stops))
            for i, (ids, text) in enumerate(body.prompts(tokenizer))
        ]
        params = dict(
            max_tokens=max_tokens,
            logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if body.echo else None,
            **chosen,
        )
        render = _CompletionRender(tokenizer, body, body.model)
        constrain = _constraints(grammars, body)
        return await _respond(engine, metrics, request, body, choices, params, render, constrain)

    @app.post("/v1/chat/completions")
    async def chat(body: api.ChatRequest, request: Request):
        chosen = adapter(body)
        body.check_tools(tokenizer)
        constrain = _constraints(grammars, body)  # bad tools are named before the prompt
        ids = body.prompt(tokenizer)
        # By default the rest of the context (at least one token: a prompt that fills
        # it is refused as too long).
        rest = max(engine.max_len - len(ids), 1)
        max_tokens = body.max_completion_tokens or body.max_tokens or rest
        choices = [_Choice(0, ids, "", api.Answer(tokenizer, body.stops))]
        params = dict(
            max_tokens=max_tokens,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            **chosen,
        )
        render = _ChatRender(tokenizer, body, body.model)
        return await _respond(engine, metrics, request, body, choices, params, render, constrain)

    return app


def _constraints(grammars: Grammars, body) -> Callable[[], Constraint] | None:
    """What gives each choice its constraint: a chat's tools (Mistral's tool format,
    `tool_choice` deciding whether it must, may or must not call), or a
    `response_format` asking for JSON (None: free text). Tools or a schema that cannot
    be enforced are the request's fault."""
    if getattr(body, "tools", None):
        tools = [t.function.model_dump(exclude_none=True) for t in body.callable_tools()]
        try:
            return grammars.tool_calls(tools, body.tool_mode, body.parallel_tool_calls is not False)
        except ValueError as e:
            raise api.ApiError(f"tools: {e}", "tools") from None
    f = body.response_format
    if f is None:
        return None
    schema = f.schema()  # refuses a type and a json_schema that do not go together
    if f.type == "text":
        return None
    try:
        return grammars.json(schema)
    except ValueError as e:
        raise api.ApiError(f"response_format: {e}", "response_format") from None


async def _respond(engine, metrics, http: Request, body, choices, params, render, constrain):
    """Submits the choices (each with its own constraint from `constrain`, if any), then
    answers: one JSON body, or an event stream."""
    call = _Call(engine, metrics, body)
    sampling = dict(
        temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed
    )
    stop_ids = frozenset() if body.ignore_eos else frozenset({render.tokenizer.eos_id})
    try:
        for choice in choices:
            constraint = constrain() if constrain else None
            call.submit(choice, stop_ids=stop_ids, constraint=constraint, **sampling, **params)
    except BaseException:
        call.cancel()
        raise
    if body.stream:
        return StreamingResponse(_events(call, render, body), media_type="text/event-stream")
    try:
        async for _ in _until_disconnect(call.outputs(), http):
            pass
    finally:
        call.cancel()
    return render.whole(call.choices)


class _InternalErrors:
    """A request that raises gets OpenAI's 500 error object, and its connection stays
    open for the next request. (An exception handler for Exception would answer the
    same, but Starlette re-raises after it and uvicorn then closes the connection under
    a client that was told it may keep it: its next request fails.) A response already
    begun (a stream) cannot be turned into an error: it ends, and the error is logged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as e:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if started:
                return
            message = f"internal error: {type(e).__name__}: {e}"
            error = api.ApiError(message, None, 500, "server_error")
            await JSONResponse(error.body(), status_code=500)(scope, receive, send)


async def _until_disconnect(items: AsyncIterator, http: Request) -> AsyncIterator:
    """`items`, until the client disconnects (then the caller cancels)."""
    watch = asyncio.ensure_future(_disconnected(http))
    try:
        iterator = aiter(items)
        while True:
            step = asyncio.ensure_future(anext(iterator))
            await asyncio.wait({step, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                return
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        watch.cancel()


async def _disconnected(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _events(call: _Call, render, body) -> AsyncIterator[str]:
    """The event stream; when the client goes away, starlette cancels this generator
    and the finally cancels what is in flight."""
    try:
        for chunk in render.opening(call.choices):
            yield _sse(chunk)
        async for choice, piece in call.outputs():
            for chunk in render.delta(choice, piece):
                yield _sse(chunk)
        if body.stream_options and body.stream_options.include_usage:
            yield _sse(render.usage_chunk(call.choices))
    except api.ApiError as e:
        yield _sse(e.body())
    except Exception as e:  # the stream has begun: the error is its last event
        log.exception("a streamed request failed")
        yield _sse(api.ApiError(f"internal error: {e}", None, 500, "server_error").body())
    finally:
        call.cancel()
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _validation_error(e: RequestValidationError) -> api.ApiError:
    """pydantic's first complaint as OpenAI's error: the field, what is wrong with it."""
    error = e.errors()[0]
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return api.ApiError(f"the body is not valid JSON: {error.get('ctx', {}).get('error', '')}")
    if error.get("type") == "extra_forbidden":
        return api.ApiError(f"unknown field {location[-1]!r}", location[-1] if location else None)
    param = location[0] if location else None
    message = error.get("msg", "invalid request")
    where = ".".join(location)
    return api.ApiError(f"{where}: {message}" if where else message, param)


class _Render:
    def __init__(self, tokenizer: Tokenizer, body, model_name: str, kind: str):
        self.tokenizer, self.body, self.model_name = tokenizer, body, model_name
        self.id = api.new_id(kind)
        self.created = api.now()

    def _head(self, object_name: str) -> dict:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model_name,
        }

    def usage(self, choices: list[_Choice]) -> dict:
        return api.usage(
            sum(len(c.prompt) for c in choices), sum(len(c.answer.tokens) for c in choices)
        )


class _CompletionRender(_Render):
    def __init__(self, tokenizer, body, model_name):
        super().__init__(tokenizer, body, model_name, "cmpl")
        self.logprobs_sent: dict[int, int] = {}

    def _logprobs(self, choice: _Choice, start: int, with_prompt: bool) -> dict | None:
        if self.body.logprobs is None:
            return None
        a = choice.answer
        tokens, logprobs = a.tokens[start:], a.logprobs[start:]
        base = len(choice.prompt_text) if self.body.echo else 0
        offsets = [base + o for o in a.offsets[start:]]
        if with_prompt and a.prompt_logprobs is not None:
            tokens = choice.prompt + tokens
            logprobs = list(a.prompt_logprobs) + logprobs
            offsets = api.prompt_offsets(self.tokenizer, choice.prompt) + offsets
        return api.completion_logprobs(self.tokenizer, tokens, logprobs, offsets)

    def whole(self, choices: list[_Choice]) -> dict:
        return {
            **self._head("text_completion"),
            "choices": [
                {
                    "index": c.index,
                    "text": (c.prompt_text if self.body.echo else "") + c.answer.text,
                    "logprobs": self._logprobs(c, 0, self.body.echo),
                    "finish_reason": c.answer.finish_reason,
                }
                for c in choices
            ],
            "usage": self.usage(choices),
        }

    def opening(self, choices: list[_Choice]) -> list[dict]:
        return []

    def delta(self, choice: _Choice, piece: str) -> list[dict]:
        sent = self.logprobs_sent.get(choice.index)
        first = sent is None
        text = (choice.prompt_text if self.body.echo and first else "") + piece
        self.logprobs_sent[choice.index] = len(choice.answer.tokens)
        logprobs = self._logprobs(choice, sent or 0, self.body.echo and first)
        if not text and not choice.answer.done and not (logprobs and logprobs["tokens"]):
            return []
        body = {
            "index": choice.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": choice.answer.finish_reason,
        }
        return [{**self._head("text_completion"), "choices": [body]}]

    def usage_chunk(self, choices: list[_Choice]) -> dict:
        return {**self._head("text_completion"), "choices": [], "usage": self.usage(choices)}


class _ChatRender(_Render):
    def __init__(self, tokenizer, body, model_name):
        super().__init__(tokenizer, body, model_name, "chatcmpl")
        self.logprobs_sent = 0

    def _logprobs(self, answer: api.Answer, start: int) -> dict | None:
        if not self.body.logprobs:
            return None
        pairs = zip(answer.tokens[start:], answer.logprobs[start:], strict=True)
        return {"content": [api.token_entry(self.tokenizer, t, lp) for t, lp in pairs]}

    def _calling(self, answer: api.Answer) -> bool:
        """The answer opens with [TOOL_CALLS]: its text is calls, not content."""
        return bool(self.body.tools) and answer.tokens[:1] == [self.tokenizer.tool_calls_id]

    def _tool_calls(self, answer: api.Answer) -> list[dict] | None:
        """A finished answer's calls in OpenAI's format, each with an id of Mistral's
        kind (9 letters and digits, which a tool message must give back); None if the
        answer calls nothing or its calls were cut short."""
        if not self._calling(answer) or answer.finish_reason != "stop" or answer.stopped:
            return None
        try:
            calls = self.tokenizer.parse_tool_calls(answer.tokens)
        except ValueError:
            log.exception("tool calls that do not parse, returned as text")
            return None
        return [{**call, "id": uuid.uuid4().hex[:9]} for call in calls]

    def _message(self, answer: api.Answer) -> tuple[dict, str | None]:
        """The assistant's message and the finish reason."""
        calls = self._tool_calls(answer)
        if calls is None:
            return {"role": "assistant", "content": answer.text}, answer.finish_reason
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"

    def whole(self, choices: list[_Choice]) -> dict:
        (c,) = choices
        message, finish_reason = self._message(c.answer)
        return {
            **self._head("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": self._logprobs(c.answer, 0),
                    "finish_reason": finish_reason,
                }
            ],
            "usage": self.usage(choices),
        }

    def _chunk(self, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def opening(self, choices: list[_Choice]) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""}, None, None)]

    def delta(self, choice: _Choice, piece: str) -> list[dict]:
        a = choice.answer
        if self._calling(a):  # calls are sent whole, when they are complete
            return self._calls_delta(a) if a.done else []
        logprobs = self._logprobs(a, self.logprobs_sent)
        self.logprobs_sent = len(a.tokens)
        chunks = []
        if piece or (logprobs and logprobs["content"]):
            chunks.append(self._chunk({"content": piece}, logprobs, None))
        if a.done:
            chunks.append(self._chunk({}, None, a.finish_reason))
        return chunks

    def _calls_delta(self, answer: api.Answer) -> list[dict]:
        message, finish_reason = self._message(answer)
        logprobs = self._logprobs(answer, 0)
        if "tool_calls" in message:
            calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            delta = {"tool_calls": calls}
        else:
            delta = {"content": message["content"]}
        return [self._chunk(delta, logprobs, None), self._chunk({}, None, finish_reason)]

    def usage_chunk(self, choices: list[_Choice]) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": self.usage(choices)}
