"""Generation with decoder variants: what the gateway serves and the validator measures.

- :mod:`~slmops.generation.spec`: the generation spec a variant carries in its metadata.
- :mod:`~slmops.generation.chat`: chat messages through the model's own template.
- :mod:`~slmops.generation.text`: tokenizer, streaming detokenizer, stop strings.
- :mod:`~slmops.generation.engine`: the token loop on onnxruntime-genai, one KV cache per request.

The runtime (onnxruntime-genai, tokenizers, jinja2) is the SDK's ``generation`` extra and is
imported only when a model is loaded or a template rendered.
"""

from slmops.generation.chat import ChatTemplateError, Prompt, render_chat
from slmops.generation.engine import (
    DecoderEngine,
    Generation,
    NotGenerationReady,
    PromptTooLong,
    Sampling,
)
from slmops.generation.spec import METADATA_KEY, TOKENIZER_KEY, GenerationSpec, stop_tokens
from slmops.generation.text import Codec, Detokenizer, StopStrings

__all__ = [
    "METADATA_KEY",
    "TOKENIZER_KEY",
    "ChatTemplateError",
    "Codec",
    "DecoderEngine",
    "Detokenizer",
    "Generation",
    "GenerationSpec",
    "NotGenerationReady",
    "Prompt",
    "PromptTooLong",
    "Sampling",
    "StopStrings",
    "render_chat",
    "stop_tokens",
]
