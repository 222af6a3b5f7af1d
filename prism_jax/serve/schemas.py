"""OpenAI's request bodies as pydantic models (the fields `serve` reads; others are ignored),
and OpenAI's error JSON."""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str


class _Sampled(_Request):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)  # one choice per request

    def stops(self) -> tuple[str, ...]:
        """The stop strings (empty ones mean nothing)."""
        given = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in given if s)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None

    def plain(self) -> dict:
        """`{"role", "content"}` with the content's text parts joined, as a template reads it."""
        parts = self.content if isinstance(self.content, list) else None
        content = "".join(p.text for p in parts) if parts is not None else self.content or ""
        return {"role": self.role, "content": content}


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class EmbeddingRequest(_Request):
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"  # base64: float32 little-endian


def error(status: int, message: str, *, kind: str = "invalid_request_error", param=None,
          code=None) -> JSONResponse:  # fmt: skip
    """OpenAI's error JSON with `status`."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(one line, the field) of pydantic's first validation error."""
    first = errors[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "missing":
        return f"missing required field {param!r}", param
    return f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param
