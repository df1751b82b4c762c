"""Pipelined placement: augmenting models on ranks of their own, serving hidden states to anchor ranks.

The launcher starts A + G workers. split_world() then gives the anchor ranks 0..A-1 a default process
group of their own, so DeepSpeed ZeRO-3 (which assumes its data-parallel group is the whole world)
sees exactly them, and gives all A + G ranks a separate gloo group for the exchange. Augmenting rank
A+g holds the frozen augmenting models and serves the anchor ranks a with a % G == g. The protocol,
point-to-point over the exchange group:

    anchor -> server: header int64 [op, batch, length], then input_ids and attention_mask (int64),
                      then int64 [number of augmenting models]: the width of model k's own tokens
                      (-1 where it reads the anchor's), and each such model's tokens and mask
    server -> anchor: the hidden state of every connected augmenting layer, in a fixed order

op is STATES (compute), BARRIER (the anchor is about to report a checkpoint to Ray Train, which every
worker must do the same number of times) or STOP. Anchors keep up to `prefetch` requests in flight,
so the augmenting forward for upcoming micro-batches runs while the anchor computes the current one.
Because servers answer requests rather than replaying the data order themselves, evaluation and
greedy decoding (whose inputs depend on the anchor's own outputs) use the same path.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from calm_dist.data.batches import ShardedBatches
from calm_dist.distributed.collectives import group_device
from calm_dist.distributed.lockstep_eval import colocated_decode_states, recomputed_decode_states
from calm_dist.model.alignment import AugmentingView, views_from_batch
from calm_dist.model.augmenting import augmenting_states
from calm_dist.model.connections import Connection

STATES, BARRIER, STOP = 1, 2, 0


@dataclass(frozen=True)
class Layout:
    """Which rank does what. Every rank builds the same Layout."""

    anchor_ranks: int
    augmenting_ranks: int

    def __post_init__(self):
        if not 1 <= self.augmenting_ranks <= self.anchor_ranks:
            raise ValueError(
                f"pipelined placement needs 1 <= augmenting ranks <= anchor ranks, got "
                f"{self.augmenting_ranks} augmenting for {self.anchor_ranks} anchor ranks"
            )

    def is_anchor(self, rank: int) -> bool:
        return rank < self.anchor_ranks

    def server_of(self, anchor_rank: int) -> int:
        return self.anchor_ranks + anchor_rank % self.augmenting_ranks

    def clients_of(self, server_rank: int) -> list[int]:
        return [a for a in range(self.anchor_ranks) if self.server_of(a) == server_rank]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@dataclass
class SplitWorld:
    exchange: dist.ProcessGroup  # all ranks, for augmenting states
    store: dist.Store  # kept alive: rank 0 hosts it

    def close(self) -> None:
        """Shut the exchange group down while the interpreter is fully alive. Nothing else would (it is
        not registered with torch.distributed), and a gloo group left to interpreter teardown can abort
        the process at exit ("terminate called without an active exception")."""
        self.exchange.shutdown()


def split_world(layout: Layout, backend: str, timeout: timedelta = timedelta(minutes=30)) -> SplitWorld:
    """Replace the launcher's world of A + G ranks by an anchor-only default group plus an exchange group.

    Called by every rank right after the launcher initialised the world (MASTER_ADDR set). Ranks keep
    their numbers: anchors are 0..A-1 in both groups.
    """
    rank, size = dist.get_rank(), dist.get_world_size()
    if size != layout.anchor_ranks + layout.augmenting_ranks:
        raise ValueError(f"world of {size} ranks, expected {layout.anchor_ranks} anchor + "
                         f"{layout.augmenting_ranks} augmenting ranks")
    # On the launcher's group's device: an NCCL group takes CUDA tensors only.
    port = torch.tensor([_free_port() if rank == 0 else 0], device=group_device())
    dist.broadcast(port, src=0)
    dist.destroy_process_group()
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(port.item()), size, is_master=rank == 0, timeout=timeout)
    exchange = dist.ProcessGroupGloo(dist.PrefixStore("exchange", store), rank, size, timeout)
    if layout.is_anchor(rank):
        os.environ["WORLD_SIZE"] = str(layout.anchor_ranks)  # what DeepSpeed checks its world against
        dist.init_process_group(backend, store=dist.PrefixStore("anchors", store), rank=rank,
                                world_size=layout.anchor_ranks, timeout=timeout)
    return SplitWorld(exchange, store)


def join_placement(config, backend: str) -> tuple[Layout | None, SplitWorld | None]:
    """What every rank does right after its launcher set up the world (a launcher.train_config.TrainConfig):
    for a pipelined run the layout and the split world (the anchors get a default group of their own);
    (None, None) for a colocated one."""
    if config.placement.mode != "pipelined":
        return None, None
    layout = Layout(config.ray.num_workers, config.placement.augmenting_workers)
    return layout, split_world(layout, backend)


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    """A view every backend can send: 16-bit floats travel as int16 (gloo lacks bf16)."""
    return tensor.view(torch.int16) if tensor.element_size() == 2 and tensor.is_floating_point() else tensor


def state_keys(connections: Sequence[Connection]) -> list[tuple[int, int]]:
    return sorted({(c.augmenting, c.aug_layer) for c in connections})


class AugmentingServer:
    """Runs on an augmenting rank: answers its anchor ranks' requests until all have stopped."""

    def __init__(self, models: Sequence[nn.Module], connections: Sequence[Connection], layout: Layout,
                 exchange: dist.ProcessGroup, device: torch.device, on_barrier: Callable[[], None]):
        self.models, self.connections, self.device = list(models), list(connections), device
        self.keys = state_keys(connections)
        self.exchange = exchange
        self.clients = layout.clients_of(exchange.rank())
        self.on_barrier = on_barrier

    def serve(self) -> int:
        """Serve until every client sent STOP; returns the number of state requests answered."""
        active, answered, sends = list(self.clients), 0, deque()
        while active:
            ops = set()
            for client in active:  # clients advance in lockstep, so a fixed round-robin order is safe
                header = torch.empty(3, dtype=torch.long)
                self.exchange.recv([header], client, 0).wait()
                op, batch, length = header.tolist()
                ops.add(op)
                if op != STATES:
                    continue
                ids = torch.empty(batch, length, dtype=torch.long)
                mask = torch.empty_like(ids)
                self.exchange.recv([ids], client, 0).wait()
                self.exchange.recv([mask], client, 0).wait()
                views = self._receive_views(client, batch)
                states = augmenting_states(self.models, self.connections, ids.to(self.device), mask.to(self.device),
                                           views=views)
                for key in self.keys:
                    tensor = states[key].contiguous().cpu()  # the exchange group is gloo, on the CPU
                    sends.append((self.exchange.send([_wire(tensor)], client, 0), tensor))
                answered += 1
                # Bound the states held for sends still in flight (clients prefetch only a few ahead).
                while len(sends) > 4 * len(self.keys) * len(self.clients):
                    sends.popleft()[0].wait()
            if len(ops) > 1:
                raise RuntimeError(f"anchor ranks {self.clients} sent different operations {sorted(ops)}")
            if ops == {BARRIER}:
                self.on_barrier()
            elif ops == {STOP}:
                active = []
        for handle, _ in sends:
            handle.wait()
        return answered

    def _receive_views(self, client: int, batch: int) -> list[AugmentingView | None]:
        """Tokens of the models with a tokenizer of their own; their visibility stays on the anchor."""
        widths = torch.empty(len(self.models), dtype=torch.long)
        self.exchange.recv([widths], client, 0).wait()
        views: list[AugmentingView | None] = []
        for width in widths.tolist():
            if width < 0:
                views.append(None)
                continue
            ids, mask = torch.empty(batch, width, dtype=torch.long), torch.empty(batch, width, dtype=torch.long)
            self.exchange.recv([ids], client, 0).wait()
            self.exchange.recv([mask], client, 0).wait()
            views.append(AugmentingView(ids.to(self.device), mask.to(self.device), torch.empty(0)))
        return views


@dataclass
class _Pending:
    receives: list  # work handles of the states' receives
    buffers: dict[tuple[int, int], torch.Tensor]  # where the states arrive
    sends: list  # work handles of the request's sends
    request: tuple[torch.Tensor, ...]  # the request's tensors, alive until their sends complete


class AugmentingClient:
    """Runs on an anchor rank: asks its server for augmenting states, optionally ahead of time."""

    def __init__(self, layout: Layout, exchange: dist.ProcessGroup, connections: Sequence[Connection],
                 widths: Sequence[int], dtypes: Sequence[torch.dtype], device: torch.device, prefetch: int):
        self.exchange = exchange
        self.server = layout.server_of(exchange.rank())
        self.keys = state_keys(connections)
        self.widths, self.dtypes, self.device, self.prefetch = list(widths), list(dtypes), device, prefetch
        self.consumed_data_state: dict | None = None

    def _send_header(self, op: int, batch: int = 0, length: int = 0) -> None:
        self.exchange.send([torch.tensor([op, batch, length], dtype=torch.long)], self.server, 0).wait()

    def request(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                views: list[AugmentingView | None] | None = None) -> _Pending:
        batch, length = input_ids.shape
        ids, mask = input_ids.cpu().long().contiguous(), attention_mask.cpu().long().contiguous()
        header = torch.tensor([STATES, batch, length], dtype=torch.long)
        views = list(views or []) + [None] * (len(self.widths) - len(views or []))
        own = [(v.input_ids.cpu().long().contiguous(), v.attention_mask.cpu().long().contiguous())
               if v is not None else None for v in views]
        lengths = torch.tensor([-1 if o is None else o[0].shape[1] for o in own], dtype=torch.long)
        tensors = (header, ids, mask, lengths, *(t for o in own if o is not None for t in o))
        sends = [self.exchange.send([tensor], self.server, 0) for tensor in tensors]
        buffers = {key: torch.empty(batch, length if own[key[0]] is None else own[key[0]][0].shape[1],
                                    self.widths[key[0]], dtype=self.dtypes[key[0]]) for key in self.keys}
        receives = [self.exchange.recv([_wire(buffers[key])], self.server, 0) for key in self.keys]
        return _Pending(receives, buffers, sends, tensors)

    def wait(self, pending: _Pending) -> dict[tuple[int, int], torch.Tensor]:
        for handle in (*pending.receives, *pending.sends):
            handle.wait()
        return {key: value.to(self.device) for key, value in pending.buffers.items()}

    def states_for(self, batch: dict) -> dict[tuple[int, int], torch.Tensor]:
        pending = batch.get("_pending")
        if pending is None:
            pending = self.request(batch["input_ids"], batch["attention_mask"], views_from_batch(batch))
        return self.wait(pending)

    def prefetched(self, batches: Iterator[dict], data_state: Callable[[], dict]) -> Iterator[dict]:
        """Yield batches whose states were requested `prefetch` batches ahead. Drawing ahead moves the
        data position early, so the position after each batch is remembered and exposed, at the time
        that batch is handed to the loop, as `consumed_data_state` (what a checkpoint must store)."""
        queue: deque = deque()
        while True:
            while len(queue) <= self.prefetch:
                batch = next(batches)
                batch["_pending"] = self.request(batch["input_ids"], batch["attention_mask"], views_from_batch(batch))
                queue.append((batch, data_state()))
            batch, state = queue.popleft()
            self.consumed_data_state = state
            yield batch

    def barrier(self) -> None:
        self._send_header(BARRIER)

    def stop(self) -> None:
        self._send_header(STOP)


# --------------------------------------------------------------------------------------------------
# The two placements as an anchor rank sees them: where its augmenting states come from


class Colocated:
    """The augmenting models on this rank, run on its own micro-batches."""

    def __init__(self, models: list[torch.nn.Module], connections: list[Connection]):
        self.models = models
        self.decode_states = colocated_decode_states(models, connections)
        self._connections = connections

    def states_for(self, batch: dict) -> dict:
        return augmenting_states(self.models, self._connections, batch["input_ids"], batch["attention_mask"],
                                 views=views_from_batch(batch))

    def feed(self, stream: Iterator[dict], batches: ShardedBatches) -> Iterator[dict]:
        return stream

    def data_state(self, batches: ShardedBatches) -> dict:
        return batches.state_dict()

    def before_checkpoint(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Pipelined:
    """The augmenting models on ranks of their own (calm_dist.distributed.placement), asked for the states
    of upcoming micro-batches ahead of time."""

    def __init__(self, client: AugmentingClient):
        self.client = client
        self.models: list[torch.nn.Module] = []  # nothing runs here, so decoding keeps no cache for them
        self.states_for = client.states_for
        self.decode_states = recomputed_decode_states(client.states_for)

    def feed(self, stream: Iterator[dict], batches: ShardedBatches) -> Iterator[dict]:
        return self.client.prefetched(stream, batches.state_dict)

    def data_state(self, batches: ShardedBatches) -> dict:
        return self.client.consumed_data_state  # drawn ahead: the position of the last batch trained on

    def before_checkpoint(self) -> None:
        self.client.barrier()  # the augmenting ranks report to Ray Train alongside

    def stop(self) -> None:
        self.client.stop()
