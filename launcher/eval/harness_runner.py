"""The composed model (or one base model alone) as lm-evaluation-harness uses it: the log-probability of
given continuations, one forward per batch, and greedy (or sampled) continuations that stop at the
harness's stop sequences, decoded with the KV caches.

Every rank holds every request: the harness runs the same on each rank (it sees a world of one), so
the requests are split here. Batches are dealt round-robin (lockstep_eval.rank_chunks); a rank left
one short runs a filler batch whose results count nowhere; decoding stops only when every row of every
rank has finished. So under ZeRO-3 every rank runs the same forwards, and afterwards every rank holds
every result. Without torch.distributed it is a world of one. No lm_eval import here: the harness's
side is launcher.eval.harness_model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from calm_dist.distributed.collectives import all_sum, everyone
from calm_dist.distributed.lockstep_eval import DecodeStates, rank_chunks
from calm_dist.model.alignment import views_from_batch
from calm_dist.model.cache import ComposedCache
from calm_dist.model.decoding import decode, left_padded


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _union(mine: dict[int, object]) -> dict[int, object]:
    """Every rank's results, on every rank."""
    if _world()[1] == 1:
        return mine
    parts: list[dict | None] = [None] * _world()[1]
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


@dataclass
class Runner:
    """model: a ComposedModel or SingleModel, or the DeepSpeed engine around one. Where the augmenting
    models run beside the model (the workers), states_for and decode_states give their states; where
    they live inside it (one process), both are None and the model computes them itself."""

    model: nn.Module
    new_cache: Callable[[], ComposedCache]
    pad_token_id: int
    eos_token_id: int | None
    states_for: Callable[[dict], dict] | None = None
    decode_states: DecodeStates | None = None
    device: torch.device | str = "cpu"

    @classmethod
    def in_process(cls, model: nn.Module, pad_token_id: int, eos_token_id: int | None) -> Runner:
        return cls(model, model.new_cache, pad_token_id, eos_token_id, device=next(model.parameters()).device)

    @property
    def _aligner(self):
        return getattr(getattr(self.model, "module", self.model), "aligner", None)

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits of every position of a batch, in one forward."""
        batch = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self._aligner is not None and self.states_for is not None:
            # The augmenting models beside the model read the text through their own tokenizers.
            batch = {k: v.to(self.device) for k, v in self._aligner.extend_batch(batch).items()}
        states = self.states_for(batch) if self.states_for is not None else None
        views = views_from_batch(batch)
        return self.model(batch["input_ids"], batch["attention_mask"], augmenting_states=states,
                          **({"augmenting_views": views} if views is not None else {})).logits

    @torch.no_grad()
    def continuation_logprobs(self, rows: Sequence[tuple[Sequence[int], int]], batch_size: int) -> list[tuple[float, bool]]:
        """For each (tokens, n): the log-probability of the last n tokens after the others, and whether
        each of them is the greedy choice. The forward reads tokens[:-1], right-padded.

        Rows with the same input share one forward (a multiple-choice question's one-token answers),
        and the forwards run longest first, in the batches the harness's hf model forms: so its scores
        are reproduced bit for bit, not only to rounding."""
        sharing: dict[tuple[int, ...], list[int]] = {}
        for i, (tokens, _) in enumerate(rows):
            sharing.setdefault(tuple(tokens[:-1]), []).append(i)
        # hf sorts each group by its member with the longest continuation (the first such).
        leader = {key: rows[max(members, key=lambda i: rows[i][1])][0] for key, members in sharing.items()}
        inputs = sorted(sharing, key=lambda key: (-len(leader[key]), tuple(leader[key])))
        rank, world = _world()
        logprob = [0.0] * len(rows)
        greedy = [0.0] * len(rows)
        for chunk, counts in rank_chunks(len(inputs), batch_size, rank, world):
            width = max(len(inputs[j]) for j in chunk)
            ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, j in enumerate(chunk):
                ids[r, :len(inputs[j])] = torch.tensor(inputs[j], dtype=torch.long)
                mask[r, :len(inputs[j])] = 1
            scores = torch.log_softmax(self.logits(ids, mask).float(), dim=-1)
            if not counts:
                continue
            for r, j in enumerate(chunk):
                end = len(inputs[j])
                for i in sharing[inputs[j]]:
                    tokens, n = rows[i]
                    target = torch.tensor(list(tokens[-n:]), dtype=torch.long, device=scores.device)
                    here = scores[r, end - n:end]
                    logprob[i] = float(here.gather(-1, target[:, None]).sum())
                    greedy[i] = float(bool((here.argmax(-1) == target).all()))
        # Each request was scored on one rank, zeros elsewhere: the sum is every rank's results.
        totals = all_sum(logprob + greedy)
        return [(totals[i], totals[len(rows) + i] > 0.5) for i in range(len(rows))]

    @torch.no_grad()
    def continuations(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stops: Sequence[str],
                      text: Callable[[list[int]], str], batch_size: int, do_sample: bool = False,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
        """The tokens generated after each prompt, cut before EOS. A row stops once text(its tokens)
        contains one of `stops` (what follows the stop is the caller's to cut), or at EOS."""
        rank, world = _world()
        mine: dict[int, object] = {}
        for chunk, counts in rank_chunks(len(prompts), batch_size, rank, world):
            generator = torch.Generator(device=self.device).manual_seed(seed) if do_sample else None
            rows = self._decode([prompts[i] for i in chunk], max_new_tokens, stops, text, generator,
                                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
            if counts:
                mine.update(zip(chunk, rows, strict=True))
        done = _union(mine)
        return [done[i] for i in range(len(prompts))]

    def _decode(self, prompts: list[Sequence[int]], max_new_tokens: int, stops: Sequence[str],
                text: Callable[[list[int]], str], generator: torch.Generator | None, **sampling) -> list[list[int]]:
        ids, mask = left_padded(prompts, self.pad_token_id)
        rows: list[list[int]] = [[] for _ in prompts]
        ended = [False] * len(prompts)  # EOS or a stop sequence
        # Without a cache of its own for the augmenting models beside it, a cross-tokenizer model
        # recomputes the prefix at every step (each new anchor token can re-split the text's tail).
        recompute = self._aligner is not None and self.states_for is not None
        cache = None if recompute else self.new_cache()

        def next_logits(ids: torch.Tensor, mask: torch.Tensor, step: int) -> torch.Tensor:
            if recompute:
                return self.logits(ids, mask)[:, -1]
            new = ids.shape[1] if step == 0 else 1
            states = self.decode_states(ids, mask, new, cache) if self.decode_states is not None else None
            return self.model(ids[:, -new:], mask, augmenting_states=states, cache=cache).logits[:, -1]

        def on_token(token: torch.Tensor) -> None:
            for r, t in enumerate(token.tolist()):
                if ended[r]:
                    continue
                if t == self.eos_token_id:
                    ended[r] = True
                    continue
                rows[r].append(t)
                ended[r] = any(stop in text(rows[r]) for stop in stops if stop)

        decode(next_logits, ids.to(self.device), mask.to(self.device), max_new_tokens=max_new_tokens,
               eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, generator=generator,
               on_token=on_token, all_finished=lambda _: everyone(all(ended)), **sampling)
        return rows
