"""The HTTP front of `serve`: OpenAI's endpoints over one `Engine` (FastAPI)."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from prism_jax.checkpoints import preprocess
from prism_jax.errors import PrismError
from prism_jax.serve import metrics, schemas
from prism_jax.serve.engine import Engine, Job, QueueFull


class Refused(Exception):
    """A request answered with OpenAI's error JSON (`status`, one line in the log)."""

    def __init__(self, status: int, message: str, *, param=None, code=None, kind=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


def log(line: str) -> None:
    print(f"prism-jax serve: {line}", file=sys.stderr, flush=True)


def _refusal(request: Request, e: Refused) -> JSONResponse:
    log(f"{request.method} {request.url.path} {e.status}: {e}")
    metrics.REQUESTS.labels(request.url.path, str(e.status)).inc()
    return schemas.error(e.status, str(e), kind=e.kind, param=e.param, code=e.code)


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The conversation rendered by the checkpoint's chat template, ready for the assistant
    (Jinja's sandbox and time limit, as `Tokenizer.chat` renders one user turn)."""
    if not tokenizer.chat_template:
        raise Refused(400, "this model's tokenizer has no chat template", param="messages")
    try:
        with preprocess._time_limit(preprocess.CHAT_SECONDS):
            template = preprocess._chat_environment().from_string(tokenizer.chat_template)
            return template.render(
                messages=messages, add_generation_prompt=True, **tokenizer.special
            )
    except Exception as e:  # noqa: BLE001 - a template's own errors are the user's to see
        raise Refused(400, f"the chat template failed: {e}", param="messages") from None


def build(engine: Engine, name: str, *, max_tokens: int = 256) -> FastAPI:
    """The application serving `engine`'s model as `name`; `max_tokens`: the new tokens of a
    chat request that names none (at most the rest of the context)."""
    app = FastAPI(title="prism-jax", docs_url=None, redoc_url=None, openapi_url=None)
    model, tok = engine.model, engine.model.tokenizer
    default_tokens = max_tokens
    created = int(time.time())

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        return _refusal(request, e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = schemas.validation_message(e.errors())
        return _refusal(request, Refused(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def http(request: Request, e: HTTPException):
        return _refusal(request, Refused(e.status_code, str(e.detail)))

    def check_model(asked: str) -> None:
        if asked != name:
            raise Refused(404, f"the model {asked!r} does not exist; this server serves {name!r}",
                          param="model", code="model_not_found")  # fmt: skip

    def sampled_job(req, ids: list[int], max_tokens: int | None, loop) -> Job:
        if not ids:
            raise Refused(400, "the prompt is empty: there is no token to continue")
        room = model.config.max_positions - len(ids)
        if max_tokens is None:  # at most the rest of the context (one token, else refused)
            max_tokens = max(min(room, default_tokens), 1)
        if len(ids) + max_tokens > model.config.max_positions:
            raise Refused(400, f"the prompt's {len(ids)} tokens plus max_tokens {max_tokens} "
                          f"are more than the model's context of {model.config.max_positions}",
                          param="messages" if hasattr(req, "messages") else "prompt",
                          code="context_length_exceeded")  # fmt: skip
        return Job("text", ids, loop, asyncio.Queue(), max_tokens=max_tokens,
                   temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                   stop=req.stops())  # fmt: skip

    def admit(jobs: list[Job]) -> None:
        try:
            engine.submit(jobs)
        except QueueFull as e:
            raise Refused(429, str(e), kind="rate_limit_error", code="queue_full") from None
        metrics.PROMPT_TOKENS.inc(sum(len(j.ids) for j in jobs))

    def needs_lm() -> None:
        if not engine.causal:
            raise Refused(400, f"{name} is not a causal language model: it serves /v1/embeddings")

    @app.post("/v1/chat/completions")
    async def chat(req: schemas.ChatRequest, request: Request):
        check_model(req.model)
        needs_lm()
        try:
            text = render_chat(tok, [m.plain() for m in req.messages])
        except PrismError as e:
            raise Refused(400, str(e), param="messages") from None
        limit = req.max_completion_tokens or req.max_tokens
        job = sampled_job(req, tok.encode_plain(text), limit, asyncio.get_running_loop())
        admit([job])
        return await answer(request, job, req.stream, chat=True)

    @app.post("/v1/completions")
    async def completions(req: schemas.CompletionRequest, request: Request):
        check_model(req.model)
        needs_lm()
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise Refused(400, "give one prompt per request", param="prompt")
        job = sampled_job(req, tok.encode_plain(prompts[0]), req.max_tokens,
                          asyncio.get_running_loop())  # fmt: skip
        admit([job])
        return await answer(request, job, req.stream, chat=False)

    async def answer(request: Request, job: Job, stream: bool, *, chat: bool):
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": ident, "created": int(time.time()), "model": name}
        tic = time.perf_counter()

        def usage(done: int) -> dict:
            return {"prompt_tokens": len(job.ids), "completion_tokens": done,
                    "total_tokens": len(job.ids) + done}  # fmt: skip

        def choice(text: str | None, reason: str | None, *, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            body = {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): body, "finish_reason": reason}

        def done(status: int) -> None:
            metrics.REQUESTS.labels(request.url.path, str(status)).inc()
            metrics.LATENCY.labels(request.url.path).observe(time.perf_counter() - tic)

        if not stream:
            parts = []
            try:
                while (event := await job.events.get())[0] == "text":
                    parts.append(event[1])
            finally:  # answered, or the client went away: the slot is free
                job.cancelled = True
                engine.release(job)
            if event[0] == "error":
                raise Refused(event[1], event[2])
            done(200)
            body = {**head, "object": kind,
                    "choices": [choice("".join(parts), event[1], delta=False)],
                    "usage": usage(event[2])}  # fmt: skip
            return JSONResponse(body)

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        async def events():
            try:
                while True:
                    event = await job.events.get()
                    if event[0] == "error":
                        error = {"message": event[2], "type": "server_error", "param": None,
                                 "code": None}  # fmt: skip
                        log(f"POST {request.url.path} stream {event[1]}: {event[2]}")
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        break
                    last = event[0] == "done"
                    text = None if last else event[1]
                    body = {
                        **head,
                        "object": chunk_kind,
                        "choices": [choice(text, event[1] if last else None, delta=True)],
                    }
                    if last:
                        body["usage"] = usage(event[2])
                    yield f"data: {json.dumps(body)}\n\n"
                    if last:
                        break
                yield "data: [DONE]\n\n"
                done(200)
            finally:  # the client went away (or the stream ended): the slot is free
                job.cancelled = True
                engine.release(job)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/embeddings")
    async def embeddings(req: schemas.EmbeddingRequest, request: Request):
        tic = time.perf_counter()
        check_model(req.model)
        if engine.causal:
            raise Refused(400, f"{name} is a causal language model: it serves no embeddings")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if tok is None:
            raise Refused(400, f"{name} has no tokenizer")
        loop = asyncio.get_running_loop()
        jobs = []
        for i, text in enumerate(texts):
            ids = [int(x) for x, m in zip(*(tok([text])[k][0] for k in
                   ("input_ids", "attention_mask")), strict=True) if m]  # fmt: skip
            if len(ids) > model.config.max_positions:
                raise Refused(400, f"input {i} has {len(ids)} tokens, more than the model's "
                              f"{model.config.max_positions} positions", param="input",
                              code="context_length_exceeded")  # fmt: skip
            jobs.append(Job("embed", ids, loop, asyncio.Queue()))
        admit(jobs)
        data = []
        for i, job in enumerate(jobs):
            event = await job.events.get()
            if event[0] == "error":
                raise Refused(event[1], event[2])
            vector = event[1]
            if req.encoding_format == "base64":  # what the openai client asks for by default
                vector = base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        used = sum(len(j.ids) for j in jobs)
        metrics.REQUESTS.labels(request.url.path, "200").inc()
        metrics.LATENCY.labels(request.url.path).observe(time.perf_counter() - tic)
        return {"object": "list", "data": data, "model": name,
                "usage": {"prompt_tokens": used, "total_tokens": used}}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        entry = {"id": name, "object": "model", "created": created, "owned_by": "prism-jax"}
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    return app
