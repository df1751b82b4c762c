"""`calm demo`: compose two tiny seeded models on this machine, generate, and round-trip a checkpoint.

Needs no downloads and no GPU; it is the first thing a newcomer runs.
"""

from __future__ import annotations

import argparse

from calm_dist.errors import CompositionError

USER_ERRORS = (CompositionError,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="where to write the composition checkpoint")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from calm_dist.checkpoint import load_composition, save_composition
    from calm_dist.composed import compose
    from calm_dist.generation import generate
    from calm_dist.tiny import tiny_model

    torch.manual_seed(args.seed)
    anchor = tiny_model("llama", layers=8, width=128, heads=4, seed=args.seed)
    augmenting = tiny_model("llama", layers=8, width=64, heads=4, seed=args.seed + 1)
    composed = compose(anchor, augmenting, every_n=4)
    print(f"anchor: {sum(p.numel() for p in anchor.parameters()):,} parameters, "
          f"augmenting: {sum(p.numel() for p in augmenting.parameters()):,}")
    print(f"connections: {[(c.aug_layer, c.anchor_layer) for c in composed.connections]} (augmenting layer -> anchor layer)")
    n_comp = sum(p.numel() for p in composed.composition_parameters())
    print(f"composition parameters: {n_comp:,} (formula {composed.expected_composition_parameters():,})")

    prompts = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(args.seed))
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0
    same = torch.equal(composed(prompts, mask).logits, anchor(prompts, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits)
    print(f"untrained composition equals the anchor bitwise: {same}")

    # A few steps on random text so the composition is no longer a no-op.
    optimizer = torch.optim.Adam(composed.composition_parameters(), lr=1e-2)
    for step in range(20):
        ids = torch.randint(3, 128, (4, 16))
        loss = composed(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0:
            print(f"step {step:2d}  loss {loss.item():.3f}")
    composed.eval()
    out = generate(composed, prompts, mask, max_new_tokens=10, eos_token_id=2)
    print("greedy generation (prompt | new tokens):")
    for row, m in zip(out.tolist(), mask.tolist(), strict=True):
        prompt = [t for t, keep in zip(row, m, strict=False) if keep]
        print(f"  {prompt} | {row[len(m):]}")

    path = save_composition(composed, args.out)
    restored = load_composition(path, anchor, augmenting)
    identical = torch.equal(restored(prompts, mask).logits, composed(prompts, mask).logits)
    print(f"checkpoint {path} (composition only) restores the model bitwise: {identical}")
    return 0 if same and identical else 1
