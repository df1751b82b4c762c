"""calm_dist.tokenizer (in-memory tokenizers), kept for one release: it is calm_dist.testing.tokenizers now."""

from calm_dist.moved import forwarding

__getattr__ = forwarding(__name__, "calm_dist.testing.tokenizers")
