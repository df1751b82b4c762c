"""`calm train` across tokenizers: an augmenting model with a Unigram tokenizer of its own beside a BPE
anchor, colocated and pipelined (the augmenting ranks get their own token ids), with evaluation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from calm_dist.testing.tiny_models import tiny_model
from calm_dist.testing.tokenizers import sample_texts, trained_tokenizer
from tests.distributed.runs import ENV, ROOT, assert_same_composition, train

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
    check_eval_and_generate(tmp_path, out / "colocated/composition")


def calm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], env=ENV, cwd=ROOT, timeout=900,
                          capture_output=True, text=True)


@torch.no_grad()
def check_eval_and_generate(folder: Path, composition: Path) -> None:
    """`calm eval` (two ZeRO-3 workers) and `calm generate` on a composition trained across tokenizers
    give the augmenting model its own tokens: their completions are the in-process composition's cached
    greedy ones, the loss is its loss, and the anchor's tokenizer in place of the augmenting one is refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calm_dist.data.batches import collate
    from calm_dist.data.records import load_records
    from calm_dist.data.tokenization import tokenize_records
    from calm_dist.model.composition_checkpoint import load_composition
    from calm_dist.model.decoding import cut_at_eos, generate

    anchor_tokenizer = AutoTokenizer.from_pretrained(folder / "anchor")
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    composed = load_composition(composition, load(folder / "anchor"), [load(folder / "augmenting")],
                                [anchor_tokenizer, AutoTokenizer.from_pretrained(folder / "augmenting")]).eval()
    prompts = [text.rsplit(" ", 1)[0] + " " for text in sample_texts(5, seed=11)]
    completions = []
    for prompt in prompts:
        ids = torch.tensor([[anchor_tokenizer.bos_token_id, *anchor_tokenizer.encode(prompt, add_special_tokens=False)]])
        new = generate(composed, ids, torch.ones_like(ids), max_new_tokens=4)[0, ids.shape[1]:].tolist()
        completions.append(anchor_tokenizer.decode(cut_at_eos([new], anchor_tokenizer.eos_token_id)[0]))
    greedy = folder / "greedy.jsonl"
    greedy.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(prompts, completions, strict=True)))
    wrong = folder / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"prompt": p, "completion": "never this"}) + "\n" for p in prompts[:3]))

    result = calm("eval", str(composition), "--data", str(greedy), str(wrong), "--workers", "2",
                  "--micro-batch-size", "2", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((composition.parent / "eval/greedy.composition.json").read_text())
    assert report["exact_match"] == 1.0 and report["samples"] == 5
    assert json.loads((composition.parent / "eval/wrong.composition.json").read_text())["exact_match"] == 0.0
    batch = collate(list(tokenize_records(load_records(greedy), anchor_tokenizer, max_length=512, prompt_field="prompt",
                                          completion_field="completion")), 0)
    logits = composed(batch["input_ids"], batch["attention_mask"]).logits
    total = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                              ignore_index=-100, reduction="sum")
    assert report["loss"] == pytest.approx(total.item() / int((batch["labels"][:, 1:] != -100).sum()), rel=1e-5)

    result = calm("generate", str(composition), "--prompt", prompts[0], "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [prompts[0] + completions[0]]

    result = calm("eval", str(composition), "--data", str(greedy), "--augmenting-tokenizer", str(folder / "anchor"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "a composition trained with one tokenizer" in result.stderr
