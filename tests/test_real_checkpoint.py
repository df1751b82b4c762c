"""The real pretrained SmolLM2-135M-Instruct (calm_dist.testing.real_checkpoint) in the composed model: it
is a real model, the composition at init is it bitwise in fp32 and bf16, cached decoding equals
recomputation, and its byte-level BPE tokenizer composes across tokenizers on either side."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from calm_dist.model.composed import compose
from calm_dist.model.decoding import complete, generate, left_padded, prompt_ids
from calm_dist.testing.tiny_models import tiny_model
from calm_dist.testing.tokenizers import tiny_tokenizer
from tests.conftest import train_steps

PROMPTS = ["The capital of Germany is", "Water boils at a temperature of", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


def load(folder, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@pytest.fixture(scope="module")
def trained(smollm2):
    """SmolLM2 composed with a second copy of itself (every 10th layer), trained a few steps."""
    return train_steps(compose(load(smollm2), load(smollm2), every_n=10), steps=3, length=10, lr=1e-2)


def test_the_asset_is_the_real_pretrained_model(smollm2, tokenizer):
    from calm_dist.model.decoding import SingleModel

    assert complete(SingleModel(load(smollm2)), tokenizer, ["The capital of Germany is"], max_new_tokens=2) == [" Berlin."]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_the_composition_at_init_is_the_anchor_bitwise(smollm2, tokenizer, dtype):
    anchor = load(smollm2, dtype)
    composed = compose(anchor, load(smollm2, dtype), every_n=10)
    ids, mask = left_padded(prompt_ids(tokenizer, PROMPTS[:1]), tokenizer.pad_token_id)
    assert torch.equal(composed(ids, mask).logits, anchor(input_ids=ids, attention_mask=mask).logits)


@torch.no_grad()
def test_cached_decoding_equals_recomputation(trained, tokenizer):
    ids, mask = left_padded(prompt_ids(tokenizer, PROMPTS), tokenizer.pad_token_id)
    cached = generate(trained, ids, mask, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    for row in range(len(PROMPTS)):
        sequence = ids[row][mask[row].bool()][None]
        for _ in range(8):
            sequence = torch.cat([sequence, trained(sequence).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(cached[row, -8:], sequence[0, -8:])


@pytest.mark.parametrize("real_side", ["anchor", "augmenting"])
@torch.no_grad()
def test_its_bpe_tokenizer_composes_across_tokenizers_on_either_side(smollm2, tokenizer, real_side):
    """SmolLM2 as the anchor with a character-level augmenting model, or as the augmenting model of a
    character-level anchor: identity at init, then cached decoding equals recomputation."""
    characters = tiny_tokenizer(128)
    small = tiny_model("llama", layers=4, width=64, heads=4, vocab=128, seed=0)
    if real_side == "anchor":
        anchor, augmenting, tokenizers = load(smollm2), small, [tokenizer, characters]
    else:
        anchor, augmenting, tokenizers = small, load(smollm2), [characters, tokenizer]
    composed = compose(anchor, augmenting, every_n=10 if real_side == "augmenting" else 2, tokenizers=tokenizers)
    ids, mask = left_padded(prompt_ids(tokenizers[0], ["the capital of", "one two three four"]), 0)
    assert torch.equal(composed(ids, mask).logits, anchor(input_ids=ids, attention_mask=mask,
                                                          position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits)
    with torch.enable_grad():
        train_steps(composed, steps=2, length=10, lr=1e-2)
    cache = composed.new_cache()
    step = ids
    continuation = tokenizers[0].encode(" is a city where people live and work", add_special_tokens=False)[:12]
    for token in continuation:
        cached = composed(step, attention_mask=mask, cache=cache).logits[:, -1]
        full = composed(ids, attention_mask=mask).logits[:, -1]
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
        step = torch.tensor([[token], [token]])
        ids, mask = torch.cat([ids, step], 1), torch.cat([mask, torch.ones_like(step)], 1)


def test_calm_generate_serves_a_composition_on_it_in_bf16(smollm2, tmp_path, capsys):
    """An untrained composition is the anchor, so `calm generate` (models spread as device_map="auto"
    spreads them, here all on the CPU) answers as SmolLM2 does, in bf16 too."""
    from calm_dist.model.composition_checkpoint import save_composition
    from launcher.cli import main

    save_composition(compose(load(smollm2), load(smollm2), every_n=10), tmp_path / "composition")
    for dtype in ("auto", "bfloat16"):
        with pytest.raises(SystemExit) as exit_code:
            main(["generate", str(tmp_path / "composition"), "--prompt", "The capital of France is",
                  "--max-new-tokens", "3", "--dtype", dtype])
        assert exit_code.value.code == 0
        assert capsys.readouterr().out.strip() == "The capital of France is Paris."
