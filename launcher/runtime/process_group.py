"""The worker group's torch process group, as Ray Train sets it up, except that on an embedded cluster
(rank 0's node address the loopback) its rendezvous store listens on the loopback, not on every
interface (calm_dist.distributed.rendezvous says why). On any other cluster this is Ray's own setup.
"""

from __future__ import annotations

from datetime import timedelta

import ray
from ray.train._internal.utils import get_address_and_port
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from calm_dist.distributed.rendezvous import is_loopback, join_process_group


def torch_config(use_gpu: bool) -> TorchConfig:
    """NCCL for GPU workers, gloo for CPU ones."""
    return _LoopbackAwareConfig(backend="nccl" if use_gpu else "gloo")


class _LoopbackAwareBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        master_addr, master_port = worker_group.execute_single(0, get_address_and_port)
        if not is_loopback(master_addr):
            super().on_start(worker_group, backend_config)
            return
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        timeout = timedelta(seconds=backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(rank, join_process_group, backend=backend_config.backend,
                                                   master_addr=master_addr, master_port=master_port,
                                                   group_rank=rank, world_size=len(worker_group), timeout=timeout)
                 for rank in range(len(worker_group))])


class _LoopbackAwareConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _LoopbackAwareBackend
