"""Which augmenting layer feeds which anchor layer.

A connection (augmenting model k, its layer i, anchor layer j) means: the output of layer i of
augmenting model k, projected to the anchor's width, is cross-attended by the output of anchor
layer j, and the result is added to the anchor's residual stream before layer j + 1.

Anchor layer -1 (INPUT) stands for the anchor's input embeddings: the cross-attention then reads and
changes the input of the anchor's first decoder layer. That lets an augmenting model supply what an
input token means to the anchor (a key's value, say) before any anchor layer has run.

Augmenting layer -1 (INPUT too) stands for the augmenting model's token embeddings, what its first
decoder layer reads. A small model trained on facts about names keeps them in the names' embeddings,
linearly readable there; each layer above adds what it predicts next, which hides them from a
projection trained on a few examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from calm_dist.errors import CompositionError

INPUT = -1  # anchor_layer into the anchor's input embeddings; aug_layer from the augmenting model's


@dataclass(frozen=True, order=True)
class Connection:
    augmenting: int
    aug_layer: int
    anchor_layer: int

    @property
    def name(self) -> str:
        """Stable name used for parameter keys in checkpoints."""
        source = "input" if self.aug_layer == INPUT else f"l{self.aug_layer}"
        target = "input" if self.anchor_layer == INPUT else f"l{self.anchor_layer}"
        return f"aug{self.augmenting}_{source}_to_anchor_{target}"


def every_n(aug_num_layers: int, anchor_num_layers: int, n: int = 4, augmenting: int = 0) -> list[Connection]:
    """The paper's default: every n-th augmenting layer, paired with evenly spaced anchor layers.

    Takes the last layer of each block of n (layers n-1, 2n-1, ...) in the augmenting model and the
    last layer of each of as many equal blocks of the anchor, so the deepest states of both meet.
    """
    if n < 1:
        raise CompositionError(f"every_n must be >= 1, got {n}")
    count = aug_num_layers // n
    if count == 0:
        raise CompositionError(
            f"augmenting model {augmenting} has {aug_num_layers} layers, fewer than every_n={n}: "
            "lower every_n or list the connections explicitly"
        )
    if count > anchor_num_layers:
        raise CompositionError(
            f"every_n={n} gives {count} connections but the anchor has only {anchor_num_layers} layers"
        )
    return [
        Connection(augmenting, (k + 1) * n - 1, (k + 1) * anchor_num_layers // count - 1)
        for k in range(count)
    ]



def every_n_all(anchor_num_layers: int, aug_num_layers: Sequence[int], n: int = 4) -> list[Connection]:
    """every_n() for each augmenting model in turn."""
    return [c for k, layers in enumerate(aug_num_layers) for c in every_n(layers, anchor_num_layers, n, augmenting=k)]


def layout(explicit: Sequence[Sequence[int]] | None, every: int | None, anchor_num_layers: int,
           aug_num_layers: Sequence[int]) -> list[Connection]:
    """The connections a config asks for (explicit (augmenting, aug_layer, anchor_layer) triples, else
    every `every`-th layer), validated: computed the same way on the driver and on every worker."""
    if explicit is not None:
        result = [Connection(*triple) for triple in explicit]
    else:
        result = every_n_all(anchor_num_layers, aug_num_layers, every)
    validate(result, aug_num_layers, anchor_num_layers)
    return result


def validate(connections: Sequence[Connection], aug_num_layers: Sequence[int], anchor_num_layers: int) -> None:
    """Raise CompositionError naming the first connection that is out of range or repeated."""
    if not connections:
        raise CompositionError("a composition needs at least one connection")
    seen: set[Connection] = set()
    for c in connections:
        if not 0 <= c.augmenting < len(aug_num_layers):
            raise CompositionError(
                f"connection {c}: augmenting model {c.augmenting} does not exist "
                f"({len(aug_num_layers)} augmenting model(s) given)"
            )
        if not INPUT <= c.aug_layer < aug_num_layers[c.augmenting]:
            raise CompositionError(
                f"connection {c}: augmenting layer {c.aug_layer} is out of range (augmenting model "
                f"{c.augmenting} has layers 0..{aug_num_layers[c.augmenting] - 1}, and {INPUT} for its token embeddings)"
            )
        if not INPUT <= c.anchor_layer < anchor_num_layers:
            raise CompositionError(
                f"connection {c}: anchor layer {c.anchor_layer} is out of range (the anchor has layers "
                f"0..{anchor_num_layers - 1}, and {INPUT} for its input embeddings)"
            )
        if c in seen:
            raise CompositionError(f"connection {c} is listed twice")
        seen.add(c)
