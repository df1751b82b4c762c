"""Iterative decoding: cached decoding equals recomputation; greedy, sampling, EOS and padding."""

import torch

from calm_dist.model.decoding import filter_logits, generate


def padded_prompts(lengths, total, seed=0, side="left"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        cols = slice(total - n, total) if side == "left" else slice(0, n)
        ids[r, cols] = torch.randint(3, 128, (n,), generator=g)
        mask[r, cols] = 1
    return ids, mask


@torch.no_grad()
def test_cached_decoding_equals_recomputation(trained_pair):
    ids, mask = padded_prompts([9, 5, 2], 9)
    cache = trained_pair.new_cache()
    step_ids, steps = ids, 24
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        cached = trained_pair(step_ids, attention_mask=mask, cache=cache).logits[:, -1]
        full = trained_pair(ids, attention_mask=mask).logits[:, -1]
        torch.testing.assert_close(cached, full, rtol=0, atol=1e-5, msg=f"step {step}")
        # Feed random tokens (not argmax) so the check covers arbitrary continuations.
        token = torch.randint(3, 128, (3, 1), generator=g)
        ids = torch.cat([ids, token], 1)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        step_ids = token
    assert cache.seq_length() == ids.shape[1] - 1
    assert all(k.shape[2] == ids.shape[1] - 1 for k in cache.keys.values())


@torch.no_grad()
def test_greedy_generation_matches_a_loop_without_cache(trained_pair):
    ids, mask = padded_prompts([6, 3], 6)
    out = generate(trained_pair, ids, mask, max_new_tokens=12)
    assert out.shape == (2, 18)
    for r in range(2):
        seq = ids[r][mask[r].bool()][None]
        for _ in range(12):
            seq = torch.cat([seq, trained_pair(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out[r, 6:], seq[0, -12:])


def test_right_padded_prompts_give_the_same_generation(trained_pair):
    left = generate(trained_pair, *padded_prompts([6, 3], 6, side="left"), max_new_tokens=5)
    right = generate(trained_pair, *padded_prompts([6, 3], 6, side="right"), max_new_tokens=5)
    assert torch.equal(left, right)


def test_sampling_is_seeded_and_top_k_1_is_greedy(trained_pair):
    ids, mask = padded_prompts([5, 5], 5, seed=2)

    def sample(seed, **kw):
        return generate(trained_pair, ids, mask, max_new_tokens=10, do_sample=True,
                        generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(7, temperature=1.5), sample(7, temperature=1.5))
    assert not torch.equal(sample(7, temperature=5.0), sample(8, temperature=5.0))
    greedy = generate(trained_pair, ids, mask, max_new_tokens=10)
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(3, top_p=1e-6), greedy)


def test_filter_logits_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=3)).tolist() == [[True, True, True, False]]


def test_generation_stops_on_eos(trained_pair):
    ids, mask = padded_prompts([4, 4], 4, seed=5)
    first = generate(trained_pair, ids, mask, max_new_tokens=1)[:, -1]
    eos = int(first[0])
    out = generate(trained_pair, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert out[0, 4] == eos and (out[0, 5:] == 0).all()
    if int(first[1]) != eos:  # the other row keeps going until it finishes or hits max_new_tokens
        assert out.shape[1] == 12 or (out[1] == eos).any()
    everyone_eos = generate(trained_pair, ids[:1], mask[:1], max_new_tokens=8, eos_token_id=eos)
    assert everyone_eos.shape == (1, 5)
