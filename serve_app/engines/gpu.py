"""Device choice, and GPU usage of this process for the workload gauges (read where the model runs)."""

from __future__ import annotations

from typing import Optional


def gpu_usage(torch) -> dict[int, tuple[int, Optional[float]]]:
    """{device: (bytes allocated by this process, utilisation 0-1 or None)}; {} without CUDA."""
    if not torch.cuda.is_available():
        return {}
    usage = {}
    for index in range(torch.cuda.device_count()):
        try:
            utilization = torch.cuda.utilization(index) / 100.0  # needs NVML (nvidia-ml-py)
        except Exception:
            utilization = None
        usage[index] = (torch.cuda.memory_allocated(index), utilization)
    return usage


def pick_device(requested: str) -> str:
    """"auto": CUDA when this process sees a GPU, else CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested
