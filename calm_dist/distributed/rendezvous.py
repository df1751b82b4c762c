"""Joining a torch.distributed process group so that its rendezvous listens where the cluster does.

torch's env:// rendezvous starts rank 0's TCPStore on every interface, whatever MASTER_ADDR says. For a
cluster reachable from this machine alone (its node address the loopback) that is an open door on a
shared network: any host that reaches the port can join or poison the group. There, rank 0 binds the
store's socket to the loopback itself and hands it to the store. Any other address keeps torch's
default, since a multi-node cluster needs its store reachable from the other nodes.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta

import torch.distributed as dist


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def join_process_group(backend: str, master_addr: str, master_port: int, group_rank: int, world_size: int,
                       timeout: timedelta) -> None:
    """init_process_group for this rank, with MASTER_ADDR/PORT, RANK and WORLD_SIZE set for the libraries
    (DeepSpeed) that read them afterwards. (Not `rank`: Ray's executor takes that name for itself.)"""
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(group_rank),
                      WORLD_SIZE=str(world_size))
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # as Ray sets it: a timeout fails
    if not is_loopback(master_addr):
        dist.init_process_group(backend=backend, init_method="env://", rank=group_rank, world_size=world_size,
                                timeout=timeout)
        return
    listen_fd = None
    if group_rank == 0:
        listener = socket.socket(socket.AF_INET6 if ":" in master_addr else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((master_addr, master_port))
        listener.listen(max(world_size, 128))
        listen_fd = listener.detach()  # the store owns and closes it
    store = dist.TCPStore(master_addr, master_port, world_size, is_master=group_rank == 0, timeout=timeout,
                          master_listen_fd=listen_fd, wait_for_workers=False)
    dist.init_process_group(backend=backend, store=store, rank=group_rank, world_size=world_size, timeout=timeout)
