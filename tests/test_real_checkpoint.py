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


def test_calm_merge_of_it_and_a_perturbed_copy_loads_and_answers(smollm2, tokenizer, tmp_path):
    """A Cocktail of SmolLM2 and a slightly perturbed copy, through `calm merge`: a folder transformers
    loads as it is, whose tensors are the correctly rounded mean, and which still answers."""
    import json

    from safetensors.torch import load_file

    from calm_dist.model.decoding import SingleModel
    from launcher.cli import main

    original = load(smollm2)
    generator = torch.Generator().manual_seed(0)
    perturbed = load(smollm2)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    perturbed.save_pretrained(tmp_path / "perturbed")
    tokenizer.save_pretrained(tmp_path / "perturbed")
    config = tmp_path / "merge.yaml"
    config.write_text(json.dumps({"method": "linear", "weights": [0.5, 0.5], "output": {"path": str(tmp_path / "merged")},
                                  "models": [{"path": str(smollm2)}, {"path": str(tmp_path / "perturbed")}]}))
    with pytest.raises(SystemExit) as exit_code:
        main(["merge", str(config), "--no-progress"])
    assert exit_code.value.code == 0
    merged = load(tmp_path / "merged")
    name = "model.layers.7.mlp.down_proj.weight"
    expected = (original.get_parameter(name).double() + load_file(tmp_path / "perturbed/model.safetensors")[name].double()) / 2
    assert torch.equal(merged.get_parameter(name), expected.float())  # one rounding of the exact mean
    assert complete(SingleModel(merged), tokenizer, ["The capital of Germany is"], max_new_tokens=2) == [" Berlin."]


# Each method's parameters in the test below (methods with a base merge SmolLM2's two perturbed copies onto it).
AS_STORED = {"sce": {"select_topk": 0.5}, "karcher": None, "della": {"density": 0.5, "epsilon": 0.15},
             "dare_linear": {"density": 0.5}}


@pytest.fixture(scope="module")
def bf16_and_fp32_copies(smollm2, tmp_path_factory):
    """SmolLM2 and two perturbed copies, each saved in bf16 and (the same values) in fp32: {(i, dtype): folder}.
    Made once for every method below."""
    root = tmp_path_factory.mktemp("as-stored")
    generator = torch.Generator().manual_seed(1)
    folders = {}
    for i in range(3):
        model = load(smollm2, torch.bfloat16)
        if i:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_((torch.randn(parameter.shape, generator=generator) * 2e-3).bfloat16())
        for dtype in (torch.bfloat16, torch.float32):
            folders[i, dtype] = root / f"in{i}-{str(dtype)[6:]}"
            model.to(dtype).save_pretrained(folders[i, dtype])
    return folders


@pytest.mark.parametrize("method", list(AS_STORED))
def test_merges_that_read_bf16_as_stored_give_its_fp32_copies_merge_to_the_bit(method, bf16_and_fp32_copies, tmp_path):
    """SCE, the Gram matrix's methods, DELLA's mask and the sparse methods' L1 norms read bfloat16
    checkpoints as stored (fast_pass.c) and float32 ones as they are: SmolLM2 and two perturbed copies saved
    in bf16, merged through `calm merge`, give the output that the same values saved in fp32 give, every
    tensor to the bit (output bf16 both times)."""
    import json

    from safetensors.torch import load_file

    from launcher.cli import main

    folders = bf16_and_fp32_copies
    merged = {}
    for dtype in (torch.bfloat16, torch.float32):
        out = tmp_path / f"out-{str(dtype)[6:]}"
        config = {"method": method, "output": {"path": str(out), "dtype": "bfloat16"},
                  "models": [{"path": str(folders[i, dtype])} for i in range(3)]}
        if AS_STORED[method] is not None:
            config |= {"base_model": folders[0, dtype].name, "parameters": AS_STORED[method]}
        (tmp_path / "merge.yaml").write_text(json.dumps(config))
        with pytest.raises(SystemExit) as exit_code:
            main(["merge", str(tmp_path / "merge.yaml"), "--no-progress"])
        assert exit_code.value.code == 0
        merged[dtype] = load_file(out / "model.safetensors")
    stored, widened = merged[torch.bfloat16], merged[torch.float32]
    assert stored.keys() == widened.keys() and all(t.dtype == torch.bfloat16 for t in stored.values())
    assert all(torch.equal(stored[name].view(torch.int16), widened[name].view(torch.int16)) for name in stored)
    base = load_file(folders[0, torch.bfloat16] / "model.safetensors")
    assert any(not torch.equal(stored[name], base[name]) for name in stored)  # a merge, not a copy


@pytest.mark.distributed
def test_calm_eval_scores_it_through_ray_and_zero3_in_bf16(smollm2, tmp_path):
    """`calm eval --anchor-only` on two Ray Train workers, SmolLM2 partitioned over them in bf16: it
    answers the capitals (the bf16 anchor is the user's anchor, not one with rounded rotary buffers)."""
    import json
    import subprocess
    import sys

    from calm_dist.model.composition_checkpoint import save_composition
    from tests.distributed.runs import ENV, ROOT

    save_composition(compose(load(smollm2), load(smollm2), every_n=10), tmp_path / "composition")
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"The capital of {country} is", "completion": city}) + "\n"
                            for country, city in (("France", "Paris."), ("Germany", "Berlin."), ("Italy", "Rome."))))
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "eval", str(tmp_path / "composition"), "--data",
                             str(data), "--anchor-only", "--workers", "2", "--max-new-tokens", "2", "--dtype", "bfloat16"],
                            env=ENV, cwd=ROOT, timeout=900, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "eval/capitals.anchor.json").read_text())
    assert report["exact_match"] == 1.0 and report["samples"] == 3 and report["workers"] == 2


def test_its_chunked_bf16_loss_trains_the_composition_as_the_whole_loss(smollm2, tokenizer, monkeypatch):
    """SmolLM2 composed in bf16, trained a step so the connections are live: with the loss taken in
    chunks of positions (as past CHUNK_LOGITS: 2 positions of its 49,152-token vocabulary a chunk), the
    loss is the whole loss's to fp32 rounding and every composition gradient the whole loss's to the bit,
    for task rows and rows that keep the anchor (KL) alike."""
    from calm_dist.model import objectives

    objectives_mean = objectives.chunked_mean
    composed = train_steps(compose(load(smollm2, torch.bfloat16), load(smollm2, torch.bfloat16), every_n=10),
                           steps=1, length=8, lr=1e-2)
    ids, mask = left_padded(prompt_ids(tokenizer, PROMPTS), tokenizer.pad_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    keep = torch.tensor([False, True, False])

    def loss_and_gradients():
        composed.zero_grad()
        loss = composed(ids, mask, labels=labels, keep_anchor=keep, keep_anchor_weight=2.0).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in composed.composition_parameters()]

    whole_loss, whole_grads = loss_and_gradients()
    monkeypatch.setattr(objectives, "CHUNK_LOGITS", 2 * composed.anchor_dims.vocab_size)
    chunked_means = []
    monkeypatch.setattr(objectives, "chunked_mean", lambda *a: chunked_means.append(a) or objectives_mean(*a))
    chunked_loss, chunked_grads = loss_and_gradients()
    assert len(chunked_means) == 2  # the task rows' cross-entropy and the kept row's KL, each in chunks
    torch.testing.assert_close(chunked_loss, whole_loss, rtol=1e-5, atol=0)
    assert any(g.abs().sum() > 0 for g in whole_grads)
    for chunked, whole in zip(chunked_grads, whole_grads, strict=True):
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
