"""The composed model in plain PyTorch and transformers, knowing nothing of how it is parallelised:
connections, cross-attention, the composed forward, caches, cross-tokenizer alignment, decoding, options
and composition checkpoints."""
