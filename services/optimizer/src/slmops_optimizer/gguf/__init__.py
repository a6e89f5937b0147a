"""GGUF sources: read the quantized blocks, load the model into torch, export it to ONNX.

- ``reader``: the architecture, the tensors and their raw blocks (the ``gguf`` package and numpy);
  Q4_0, Q4_1 and Q8_0 blocks split into codes, scales and minimums.
- ``loader``: the model dequantized into a transformers causal LM plus its tokenizer.
- ``export``: that model exported to a single-output (``logits``) ONNX graph.

Nothing is imported here: the submodules pull in gguf, torch and transformers, which the service
only pays for inside a pass's ``run``.
"""
