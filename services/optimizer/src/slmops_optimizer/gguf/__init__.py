"""GGUF sources: read the quantized blocks, load the model into torch, map the blocks to ONNX.

- ``reader``: the architecture, metadata and tensors (the ``gguf`` package and numpy).
- ``blocks``: the block layouts (Q4_0..Q8_0, Q2_K..Q6_K) split into codes, scales, offsets.
- ``mapping``: those blocks as MatMulNBits / GatherBlockQuantized tensors, in a chosen form.
- ``matching``: which ONNX weight holds which GGUF tensor (by content; packed qkv by segments).
- ``rewrite``: the replacement nodes.
- ``loader``: the model dequantized into a transformers causal LM plus its tokenizer.
- ``export``: that model exported to a single-output (``logits``) ONNX graph.

Nothing is imported here: the submodules pull in gguf, torch and transformers, which the service
only pays for inside a pass's ``run``.
"""
