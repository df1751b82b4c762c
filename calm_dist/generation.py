"""calm_dist.generation (decoding), kept for one release: it is calm_dist.model.decoding now."""

from calm_dist.moved import forwarding

__getattr__ = forwarding(__name__, "calm_dist.model.decoding")
