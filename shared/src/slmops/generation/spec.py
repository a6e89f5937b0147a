"""What a runtime needs to generate with a decoder variant, stamped into the variant itself.

A generation-ready variant is one ONNX file: the graph (KV cache in and out) plus, in its
metadata, the tokenizer (``slmops.tokenizer``, a Hugging Face ``tokenizer.json``) and this spec
(``slmops.generation``, JSON): the chat template, special and stop tokens, the context length
and the runtime's own config. The optimizer writes it; the validator and every gateway read it,
so none of them needs the source folder or a model hub.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: The metadata key of the JSON-encoded :class:`GenerationSpec`.
METADATA_KEY = "slmops.generation"
#: The metadata key of the Hugging Face tokenizer (``tokenizer.json`` as a string).
TOKENIZER_KEY = "slmops.tokenizer"

#: Special tokens that end a turn in the chat formats small models ship with (ChatML, Gemma,
#: Llama 3, Phi-3...): generation stops on them as it does on the model's eos (llama.cpp calls
#: these end-of-generation tokens).
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
)


class GenerationSpec(BaseModel):
    """How to prompt and stop a decoder, and how its runtime loads it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    runtime: str = Field("onnxruntime-genai", description="The runtime the graph was built for.")
    runtime_config: dict[str, Any] = Field(
        description="The runtime's own config (onnxruntime-genai's genai_config.json)."
    )
    context_length: int = Field(gt=0, description="Most tokens a sequence may hold.")
    vocab_size: int = Field(gt=0)
    chat_template: str | None = Field(None, description="Jinja2 chat template, if any.")
    special_tokens: dict[str, str] = Field(
        default_factory=dict,
        description="bos_token, eos_token, pad_token, unk_token...: the template's variables.",
    )
    stop_token_ids: list[int] = Field(
        default_factory=list, description="Generation ends when one of these is produced."
    )

    @property
    def _decoder(self) -> dict[str, Any]:
        decoder: dict[str, Any] = self.runtime_config["model"]["decoder"]
        return decoder

    @property
    def layers(self) -> int:
        return int(self._decoder["num_hidden_layers"])

    @property
    def kv_heads(self) -> int:
        return int(self._decoder["num_key_value_heads"])

    @property
    def head_size(self) -> int:
        return int(self._decoder["head_size"])

    def empty_past(self, batch: int) -> dict[str, Any]:
        """Zero-length past keys and values: the feeds that run the graph over a whole window in
        a plain ONNX Runtime session (no cache), as the optimizer's score and the validator's
        parity do."""
        import numpy as np

        names = self._decoder["inputs"]
        shape = (batch, self.kv_heads, 0, self.head_size)
        past: dict[str, Any] = {}
        for layer in range(self.layers):
            for template in (names["past_key_names"], names["past_value_names"]):
                past[template % layer] = np.zeros(shape, dtype=np.float32)
        return past

    def to_metadata(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> GenerationSpec | None:
        """The spec of a variant's metadata; None for a model that is not generation-ready."""
        raw = metadata.get(METADATA_KEY)
        return None if raw is None else cls.model_validate(json.loads(raw))


def stop_tokens(tokenizer_json: str, eos_token_ids: list[int]) -> list[int]:
    """The model's eos ids plus every special token that ends a turn in a known chat format."""
    data = json.loads(tokenizer_json)
    found = set(eos_token_ids)
    for token in data.get("added_tokens", []):
        if token.get("special") and token.get("content") in END_OF_TURN_TOKENS:
            found.add(int(token["id"]))
    return sorted(found)
