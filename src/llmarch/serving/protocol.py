"""The OpenAI API's request fields, checked, and its response and error shapes.

Only what llmarch can honour is accepted: one choice (``n == 1``), text content. A field of
the wrong type or out of range is an :class:`APIError` (HTTP 400, OpenAI's error JSON)
naming the field; unknown fields are ignored, as OpenAI's own server does for most.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..inference.generate import GenerationConfig

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """A completion request, ready for the scheduler."""

    prompt: list[int]
    config: GenerationConfig
    stream: bool
    include_usage: bool


def _field(body: dict, name: str, types: type | tuple[type, ...], default: Any = None, what: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        value = object()  # JSON true/false is not a number
    if not isinstance(value, types):
        raise APIError(400, f"'{name}' must be {what}, got {body.get(name)!r}", param=name, code="invalid_type")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = float(_field(body, name, (int, float), default, "a number"))
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise APIError(400, f"'{name}' must be in {interval}, got {value}", param=name, code="invalid_value")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 of them", param="stop",
                       code="invalid_type")
    return stops


def check_model(body: dict, served: str) -> None:
    model = _field(body, "model", str, None, "a string")
    if model is not None and model != served:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served}'", param="model",
                       code="model_not_found")


def parse(body: Any, prompt: list[int], context: int, default_max_tokens: int | None) -> Request:
    """The sampling fields common to both endpoints (``prompt`` already tokenised)."""
    if _field(body, "n", int, 1, "an integer") != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")
    max_tokens = _field(body, "max_completion_tokens", int, None, "an integer")
    max_tokens = _field(body, "max_tokens", int, max_tokens, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens",
                       code="invalid_value")
    room = context - len(prompt)
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    if len(prompt) + max_tokens > context or max_tokens < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(prompt) + max(max_tokens, 1)} tokens ({len(prompt)} in the prompt, {max(max_tokens, 1)} for the "
            f"completion). Please reduce the prompt or max_tokens.",
            param="max_tokens", code="context_length_exceeded",
        )
    seed = _field(body, "seed", int, None, "an integer")
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=seed,
        stop=_stop(body),
        max_context=None,
    )
    stream = _field(body, "stream", bool, False, "a boolean")
    options = _field(body, "stream_options", dict, {}, "an object")
    return Request(prompt, config, stream, bool(options.get("include_usage")))


def completion_prompt(body: dict, tokenizer) -> list[int]:
    """``prompt``: a string, or token ids, or a list holding one of them."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise APIError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)",
                   param="prompt", code="invalid_type")


def chat_messages(body: dict) -> list[dict]:
    """``messages`` as the chat template wants them: role and text content."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages",
                       code="invalid_type" if not isinstance(messages, list) else "empty_array")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"{where} must be an object with a role among {', '.join(ROLES)}", param=where,
                           code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content: only text parts are supported", param=f"{where}.content",
                               code="invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string", param=f"{where}.content", code="invalid_type")
        out.append({"role": m["role"], "content": content})
    return out


# -- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(rid: str, obj: str, model: str, choices: list[dict], use: dict | None = None) -> dict:
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def completion_choice(text: str, finish: str | None, chat: bool, stream: bool, first: bool = False) -> dict:
    reason = FINISH_REASONS.get(finish, finish) if finish else None
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    if stream:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
