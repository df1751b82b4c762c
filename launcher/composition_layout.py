"""Connections as the config asks for them, computed the same way on the driver and on workers."""

from __future__ import annotations

from collections.abc import Sequence

from calm_dist.model import connections as conn
from calm_dist.model.connections import Connection
from launcher.train_config import CompositionConfig


def connections_for(
    composition: CompositionConfig, anchor_layers: int, augmenting_layers: Sequence[int]
) -> list[Connection]:
    if composition.connections is not None:
        result = [Connection(*triple) for triple in composition.connections]
    else:
        result = [
            c
            for k, layers in enumerate(augmenting_layers)
            for c in conn.every_n(layers, anchor_layers, composition.every_n, augmenting=k)
        ]
    conn.validate(result, augmenting_layers, anchor_layers)
    return result
