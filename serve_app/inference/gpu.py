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


def torch_runtime(runtime, memory_cap: Optional[float], num_threads: int, fp16: bool = False):
    """(torch, device, dtype) for a workload's `runtime` section (offline, device): the hub switched
    off if asked, torch on `num_threads`, fp16 only if asked and on CUDA, and on CUDA this process
    capped at `memory_cap` of the GPU's memory (placement.memory_cap)."""
    import os

    if runtime.offline:
        # Before huggingface_hub / transformers are imported: they read these once.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(num_threads)
    device = pick_device(runtime.device)
    if device == "cuda" and memory_cap:
        # Fractional num_gpus is only bookkeeping: without the cap a replica could take its
        # neighbours' memory. Past it, this replica gets the OOM, not the others.
        torch.cuda.set_per_process_memory_fraction(memory_cap)
    return torch, device, torch.float16 if device == "cuda" and fp16 else torch.float32
