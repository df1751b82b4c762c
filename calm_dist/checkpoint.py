"""calm_dist.checkpoint (composition checkpoints), kept for one release: it is calm_dist.model.composition_checkpoint now."""

from calm_dist.moved import forwarding

__getattr__ = forwarding(__name__, "calm_dist.model.composition_checkpoint")
