"""Pipelined placement: who serves whom, and the config's guard on it."""

import pytest

from calm_dist.distributed.placement import Layout


def test_every_anchor_rank_has_exactly_one_server():
    layout = Layout(anchor_ranks=5, augmenting_ranks=2)
    assert [layout.server_of(a) for a in range(5)] == [5, 6, 5, 6, 5]
    assert layout.clients_of(5) == [0, 2, 4] and layout.clients_of(6) == [1, 3]
    assert all(layout.is_anchor(r) for r in range(5)) and not layout.is_anchor(5)


def test_more_servers_than_anchors_is_refused():
    with pytest.raises(ValueError, match="1 <= augmenting ranks <= anchor ranks"):
        Layout(anchor_ranks=1, augmenting_ranks=2)


def test_config_refuses_idle_augmenting_workers(tmp_path):
    from launcher.train_config import ConfigError, load_config

    config = tmp_path / "c.yaml"
    config.write_text(
        "name: x\nmodels: {anchor: {path: a}, augmenting: [{path: b}]}\ndata: {train: t.jsonl, text_field: text}\n"
        "training: {steps: 1, micro_batch_size: 1, global_batch_size: 2}\n"
        "placement: {mode: pipelined, augmenting_workers: 3}\nray: {num_workers: 2}\n"
    )
    with pytest.raises(ConfigError, match="placement.augmenting_workers=3 exceeds ray.num_workers=2"):
        load_config(config)
