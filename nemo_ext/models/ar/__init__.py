"""Cosmos-1 autoregressive world model (video GPT over discrete tokens) as megatron-core modules.

* :mod:`.config`     - ``ARConfig`` (the ``model`` group of the AR family), parallel-layout checks, FLOPs
* :mod:`.embeddings` - 3D RoPE (+ YaRN), fixed sin-cos and learnable absolute 3D position embeddings
* :mod:`.layer`      - the GPT layer spec (GQA causal self-attention, optional cross-attention, SwiGLU)
* :mod:`.model`      - ``CosmosAR`` (TP/SP/PP), ``build_transformer_config``
* :mod:`.generate`   - KV-cache sampling (greedy / temperature / top-k / top-p)
"""
