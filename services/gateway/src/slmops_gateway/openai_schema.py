"""OpenAI's request and response shapes for the local inference routes.

Local apps written against OpenAI's API (or llama.cpp's and Ollama's OpenAI-compatible ones)
talk to the gateway unchanged. Requests ignore fields they do not know, as OpenAI's server
does, so a newer client keeps working; options the gateway cannot honour (``n`` > 1, tools,
log probabilities, penalties) are refused with a message instead of being silently dropped,
since the caller would otherwise get an answer it did not ask for. ``model`` is accepted and
ignored: a gateway serves the one model its rollout installed (as llama.cpp's server does).
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_EMBEDDING_INPUTS = 256  # texts per embeddings request


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Ignored: the gateway serves its active model.")


def _unsupported(what: str) -> ValueError:
    return ValueError(f"{what} is not supported by this gateway")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingFields(_Request):
    """Sampling fields chat and text completions share."""

    max_tokens: int | None = Field(None, ge=1, description="Default: up to the context length.")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy. Default 1.")
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise _unsupported("n other than 1 (one choice per request; send requests in parallel)")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> bool | int | None:
        if value:
            raise _unsupported("logprobs")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise _unsupported("a non-zero presence or frequency penalty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise _unsupported("logit_bias")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        raw = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in raw if s)

    @property
    def token_budget(self) -> int | None:
        """Most tokens to generate (None: up to the context)."""
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ChatMessage:
        if self.role in ("tool", "function"):
            raise _unsupported(f"a {self.role!r} message (tool calling)")
        if self.content is None:
            raise ValueError(f"a {self.role!r} message needs content")
        if isinstance(self.content, list):
            other = sorted({p.type for p in self.content if p.type != "text" or p.text is None})
            if other:
                raise _unsupported(f"content of type {', '.join(other)} (text only)")
        return self

    def as_template_input(self) -> dict[str, str]:
        """``{"role", "content"}`` for the chat template (OpenAI's newer ``developer`` role is
        the ``system`` role templates know)."""
        role = "system" if self.role == "developer" else self.role
        content = self.content
        text = content if isinstance(content, str) else "".join(p.text or "" for p in content or [])
        return {"role": role, "content": text}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Wins over max_tokens.")
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise _unsupported("tool calling")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value.get("type", "text") != "text":
            raise _unsupported(f"response_format {value.get('type')!r} (text only)")
        return value

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            if len(value) != 1:
                raise _unsupported("more than one prompt per request")
            value = value[0]
        if len(value) == 0:
            raise ValueError("the prompt is empty")
        return value  # type: ignore[no-any-return]

    @model_validator(mode="after")
    def _plain(self) -> CompletionRequest:
        if self.echo:
            raise _unsupported("echo")
        if self.suffix:
            raise _unsupported("suffix")
        if self.best_of not in (None, 1):
            raise _unsupported("best_of")
        return self

    @property
    def prompt_input(self) -> str | list[int]:
        """The one prompt: text or token ids (the validator unwrapped a one-item list)."""
        return cast("str | list[int]", self.prompt)


class EmbeddingRequest(_Request):
    input: str | list[str] = Field(description="A text or a list of texts.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32, as OpenAI's clients ask by default."
    )
    dimensions: int | None = None

    @field_validator("input")
    @classmethod
    def _texts(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts or len(texts) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"send 1 to {MAX_EMBEDDING_INPUTS} texts")
        if any(not t for t in texts):
            raise ValueError("empty texts cannot be embedded")
        return value

    @field_validator("dimensions")
    @classmethod
    def _native(cls, value: int | None) -> int | None:
        if value is not None:
            raise _unsupported("dimensions (vectors have the model's own width)")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# --- responses ----------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str = Field(description="The variant id that answered.")
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str = Field(description="The variant id that answered.")
    choices: list[CompletionChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str = Field(description="The model's name (its variant id if the name is unknown).")
    object: Literal["model"] = "model"
    created: int = Field(description="When this gateway loaded it (Unix seconds).")
    owned_by: str = "slmops"
    variant_id: str
    version: str
    task: str
    chat: bool = Field(description="Served by /v1/chat/completions (a generation-ready decoder).")
    context_length: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
