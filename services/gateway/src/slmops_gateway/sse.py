"""Streamed answers in OpenAI's server-sent-event format.

Each event is one ``data: <json>\\n\\n`` line; the stream ends with ``data: [DONE]``. A chat
stream opens with a chunk carrying the role, then one chunk per text piece, then an empty
delta with the ``finish_reason``; with ``stream_options.include_usage`` every chunk carries
``"usage": null`` and one last chunk with no choices carries the counts (OpenAI's order, which
its client libraries parse). A failure after the stream started can no longer change the HTTP
status: it is sent as an ``{"error": ...}`` event, as OpenAI's server does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from slmops_gateway.errors import GenerationFailed
from slmops_gateway.openai_schema import Usage
from slmops_gateway.serving import Outcome, TextRun

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event holding ``payload`` as compact JSON."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def usage_of(outcome: Outcome) -> Usage:
    return Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                 total_tokens=outcome.prompt_tokens + outcome.completion_tokens)  # fmt: skip


@dataclass
class Chunks:
    """The chunks of one streamed answer: ``chat`` (chat.completion.chunk, ``delta``) or
    ``text`` (text_completion, ``text``)."""

    kind: Literal["chat", "text"]
    model: str
    fingerprint: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, content: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> dict[str, Any] | None:
        """The role chunk of a chat stream (a text stream has none)."""
        if self.kind != "chat":
            return None
        return self._chunk([self._choice({"delta": {"role": "assistant", "content": ""}}, None)])

    def piece(self, text: str) -> dict[str, Any]:
        content = {"delta": {"content": text}} if self.kind == "chat" else {"text": text}
        return self._chunk([self._choice(content, None)])

    def finish(self, reason: str) -> dict[str, Any]:
        content: dict[str, Any] = {"delta": {}} if self.kind == "chat" else {"text": ""}
        return self._chunk([self._choice(content, reason)])

    def usage(self, usage: Usage) -> dict[str, Any]:
        return {**self._chunk([]), "usage": usage.model_dump()}


def error_event(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


async def stream(run: TextRun, chunks: Chunks) -> AsyncIterator[bytes]:
    """The SSE body of ``run``; closing it early (the client left) cancels the generation."""
    pieces = run.pieces()
    try:
        if (opening := chunks.opening()) is not None:
            yield sse(opening)
        try:
            async for text in pieces:
                yield sse(chunks.piece(text))
                await asyncio.sleep(0)  # lets a disconnect cancel us even when text is queued
        except GenerationFailed as exc:
            yield sse(error_event(exc.message, exc.code))
            return
        assert run.outcome is not None  # pieces() ended normally
        yield sse(chunks.finish(run.outcome.finish_reason))
        if chunks.include_usage:
            yield sse(chunks.usage(usage_of(run.outcome)))
        yield DONE
    finally:
        run.cancel()  # a client that left stops the generation at its next token
        await pieces.aclose()
