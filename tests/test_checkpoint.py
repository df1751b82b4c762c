"""Composition checkpoints hold only the composition and restore it bitwise."""

import json

import pytest
import torch
from safetensors import safe_open

from calm_dist.errors import CompositionError
from calm_dist.model.composed import compose
from calm_dist.model.composition_checkpoint import MANIFEST, WEIGHTS, load_composition, save_composition
from calm_dist.testing.tiny_models import tiny_model


def test_roundtrip_is_bitwise_and_holds_only_composition(trained_pair, tmp_path):
    path = save_composition(trained_pair, tmp_path / "ckpt")
    with safe_open(path / WEIGHTS, "pt") as f:
        names = set(f.keys())
    assert names == set(trained_pair.composition.state_dict())
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["connections"] == [
        {"augmenting": c.augmenting, "aug_layer": c.aug_layer, "anchor_layer": c.anchor_layer}
        for c in trained_pair.connections
    ]
    assert manifest["anchor"]["hidden_size"] == 64 and manifest["augmenting"][0]["hidden_size"] == 32

    restored = load_composition(path, trained_pair.anchor, trained_pair.augmenting[0])
    for k, v in trained_pair.composition.state_dict().items():
        assert torch.equal(restored.composition.state_dict()[k], v)
    ids = torch.randint(3, 128, (2, 9))
    assert torch.equal(restored(ids).logits, trained_pair(ids).logits)
    assert not list(tmp_path.glob(".ckpt.*")), "no staging folder left behind"


def test_loading_onto_other_models_names_the_mismatch(trained_pair, tmp_path):
    path = save_composition(trained_pair, tmp_path / "ckpt")
    aug = trained_pair.augmenting[0]
    with pytest.raises(CompositionError, match="anchor hidden_size is 64 in the checkpoint but the given anchor has 32"):
        load_composition(path, tiny_model(width=32, heads=2), aug)
    with pytest.raises(CompositionError, match="augmenting model 0 num_layers is 4 .* has 2"):
        load_composition(path, trained_pair.anchor, tiny_model(layers=2, width=32, heads=2))
    with pytest.raises(CompositionError, match="anchor model_type is 'llama' .* has 'gpt2'"):
        load_composition(path, tiny_model("gpt2", width=64), aug)
    with pytest.raises(CompositionError, match="1 augmenting model.* but 2 were given"):
        load_composition(path, trained_pair.anchor, [aug, aug])


def test_bad_checkpoint_folders_are_named(trained_pair, tmp_path):
    with pytest.raises(CompositionError, match="composition.json: not found"):
        load_composition(tmp_path, trained_pair.anchor, trained_pair.augmenting[0])
    path = save_composition(trained_pair, tmp_path / "ckpt")
    (path / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CompositionError, match="composition.safetensors: unreadable"):
        load_composition(path, trained_pair.anchor, trained_pair.augmenting[0])


def test_bf16_composition_roundtrip(tmp_path):
    composed = compose(tiny_model(dtype=torch.bfloat16), tiny_model(width=32, heads=2, dtype=torch.bfloat16), every_n=2, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in composed.composition_parameters():
            p.normal_()
    restored = load_composition(save_composition(composed, tmp_path / "c"), composed.anchor, composed.augmenting[0])
    assert all(p.dtype == torch.bfloat16 for p in restored.composition_parameters())
    ids = torch.randint(3, 128, (1, 6))
    assert torch.equal(restored(ids).logits, composed(ids).logits)


def test_saving_never_replaces_what_is_not_a_composition(trained_pair, tmp_path):
    experiment = tmp_path / "runs"
    (experiment / "other-run").mkdir(parents=True)
    (experiment / "notes.txt").write_text("unrelated")
    with pytest.raises(CompositionError, match=f"{experiment}: not empty and not a composition checkpoint"):
        save_composition(trained_pair, experiment)
    assert (experiment / "notes.txt").read_text() == "unrelated" and (experiment / "other-run").is_dir()

    composition = save_composition(trained_pair, tmp_path / "ckpt")
    (composition / "README.md").write_text("mine")
    with pytest.raises(CompositionError, match="also holds other files \\(README.md\\)"):
        save_composition(trained_pair, composition)
    assert (composition / "README.md").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CompositionError, match="exists and is not a folder"):
        save_composition(trained_pair, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "file", "runs"]  # no staging left


def test_an_existing_composition_is_replaced_in_one_step(trained_pair, tmp_path, monkeypatch):
    import calm_dist.model.composition_checkpoint as checkpoint

    path = save_composition(trained_pair, tmp_path / "ckpt", extra={"trained_steps": 1})
    # A crash while the new one is written leaves the old one whole.
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_composition(trained_pair, path, extra={"trained_steps": 2})
    assert json.loads((path / MANIFEST).read_text())["trained_steps"] == 1
    monkeypatch.undo()

    # The swap is one rename: at no moment is there no complete checkpoint at the path.
    seen = []
    real_rmtree = checkpoint.shutil.rmtree

    def rmtree_observing(target, *args, **kwargs):
        seen.append(json.loads((path / MANIFEST).read_text())["trained_steps"])
        return real_rmtree(target, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree_observing)
    save_composition(trained_pair, path, extra={"trained_steps": 2})
    assert seen == [2]  # the old folder is deleted only after the new one took its place
    assert json.loads((path / MANIFEST).read_text())["trained_steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    restored = load_composition(path, trained_pair.anchor, trained_pair.augmenting[0])
    for k, v in trained_pair.composition.state_dict().items():
        assert torch.equal(restored.composition.state_dict()[k], v)
