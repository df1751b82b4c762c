"""`calm train` across tokenizers: an augmenting model with a Unigram tokenizer of its own beside a BPE
anchor, colocated and pipelined (the augmenting ranks get their own token ids), with evaluation."""

import json
from pathlib import Path

import pytest
import yaml

from calm_dist.tiny import tiny_model
from calm_dist.tokenizer import sample_texts, trained_tokenizer
from tests.distributed.runs import ROOT, assert_same_composition, train

pytestmark = pytest.mark.distributed


def cross_config(folder: Path) -> Path:
    texts = sample_texts(600, seed=0)
    assets = {"anchor": (trained_tokenizer("bpe", texts, 500), 64, 4), "augmenting": (trained_tokenizer("unigram", texts, 300), 32, 2)}
    for seed, (name, (tokenizer, width, heads)) in enumerate(assets.items()):
        tiny_model("llama", layers=4, width=width, heads=heads, vocab=len(tokenizer), seed=seed).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    records = [{"prompt": text.rsplit(" ", 1)[0] + " ", "completion": text.rsplit(" ", 1)[1]} for text in texts[:64]]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    config["models"] = {"anchor": {"path": str(folder / "anchor"), "dtype": "float32"},
                        "augmenting": [{"path": str(folder / "augmenting"), "dtype": "float32",
                                        "tokenizer": str(folder / "augmenting")}]}
    config["data"].update(train=str(folder / "train.jsonl"), eval=str(folder / "train.jsonl"), max_length=48)
    config["training"].update(steps=2, micro_batch_size=4, global_batch_size=8, checkpoint_every=None, eval_every=2,
                              eval_samples=8, eval_max_new_tokens=3, log_every=1, schedule={"kind": "constant"})
    config["ray"].update(storage_path=str(folder / "ray"), max_failures=0)
    config["output_dir"] = str(folder / "out")
    path = folder / "cross.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_colocated_and_pipelined_train_the_same_composition_across_tokenizers(tmp_path):
    config = cross_config(tmp_path)
    train(config, "--set", "name=colocated")
    train(config, "--set", "name=pipelined", "--set", "placement.mode=pipelined", "--set", "placement.augmenting_workers=1")
    out = tmp_path / "out"
    logs = {run: [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("colocated", "pipelined")}
    assert [m["loss"] for m in logs["colocated"]] == pytest.approx([m["loss"] for m in logs["pipelined"]], abs=1e-6)
    assert "eval_exact_match" in logs["colocated"][-1] and "eval_loss" in logs["pipelined"][-1]
    assert_same_composition(out, "colocated", "pipelined", trained_steps=2)
    recorded = json.loads((out / "pipelined/composition/composition.json").read_text())["tokenizers"]
    assert recorded["augmenting"][0]["vocab_size"] == 300 and recorded["anchor"]["vocab_size"] == 500
