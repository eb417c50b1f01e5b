"""The few collective operations the fits need, over torch.distributed when a process group exists.

Model code calls these and stays free of Ray: inside a Ray Train worker the TorchTrainer has already set
up the process group (gloo on CPU, nccl on GPU); in a plain process they are identities.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _comm_device(tensor: torch.Tensor) -> torch.device:
    # nccl only moves CUDA tensors; gloo only CPU ones.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not is_distributed():
        return tensor.clone()
    buf = tensor.to(_comm_device(tensor)).clone()
    dist.all_reduce(buf, op=op)
    return buf.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all workers (a new tensor on the input's device)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max of `tensor` over all workers."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every worker's rows in rank order; workers may hold different row counts."""
    if not is_distributed():
        return tensor
    device = _comm_device(tensor)
    local = tensor.to(device).contiguous()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=device))
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)]).to(tensor.device)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """rank `src`'s tensor on every worker. Shapes may differ between ranks before the call."""
    if not is_distributed():
        return tensor
    device = _comm_device(tensor)
    shape = torch.tensor(list(tensor.shape) if rank() == src else [0] * tensor.dim(), device=device)
    dist.broadcast(shape, src)
    buf = tensor.to(device).contiguous() if rank() == src else torch.empty(
        tuple(int(s) for s in shape), dtype=tensor.dtype, device=device)
    dist.broadcast(buf, src)
    return buf.to(tensor.device)
