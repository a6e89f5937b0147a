"""Generation-ready decoders: onnxruntime-genai's builder graph, and the metadata a runtime needs.

- ``build``: a Hugging Face folder → the builder's fp32 graph with a KV cache.
- ``metadata``: tokenizer, chat template, special and stop tokens, context length and the
  runtime config, stamped into the variant so the validator and gateways need nothing else.

Nothing is imported here: the submodules pull in torch, transformers and onnxruntime-genai.
"""
