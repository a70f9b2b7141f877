"""What the routes and backends read of the running call: the compute dtype and the current stream."""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the frozen layer's output: autocast's dtype when it is on, else the weight's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but the frozen weight is {weight.dtype}; outside autocast they must "
                        f"match (as for F.linear)")
    return weight.dtype


def stream_of(t: torch.Tensor):
    """The stream ``t``'s device runs work on now: CUDA's current stream (its raw handle, a cheap
    query); None on CPU, where everything is ordered."""
    return torch._C._cuda_getCurrentRawStream(t.device.index) if t.is_cuda else None
