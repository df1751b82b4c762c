"""calm_dist.composed (the composed model), kept for one release: it is calm_dist.model.composed now."""

from calm_dist.moved import forwarding

__getattr__ = forwarding(__name__, "calm_dist.model.composed")
