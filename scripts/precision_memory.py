"""Memory of one training step in float32 and under bf16 mixed precision, and the batch that fits.

On a GPU (``device="cuda"``) the figure is what the claim is about: the peak of
``torch.cuda.max_memory_allocated`` over one forward + backward + optimizer step, from a reset
right before it (the model, its gradients and the optimizer state already allocated). On a CPU no
allocator reports a peak, so what is measured there is the memory that grows with the batch: the
bytes of the tensors autograd saves for the backward pass (``saved_tensors_hooks``, each storage
counted once), which bf16 autocast stores in 16 bits where it casts. Either way the per-sample cost
is the slope between two batch sizes, and ``fit_ratio`` says how many times larger a batch bf16
fits in the float32 step's memory at the reference batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from epochwise.modules import SimpleCNN


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward pass."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def cuda_step_peak_bytes(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                         bf16: bool) -> int:
    """Peak bytes allocated on the GPU during one training step (after one warm-up step)."""
    for measured in (False, True):
        torch.cuda.synchronize()
        if measured:
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def step_memory(device: str, batch: int, bf16: bool, side: int = 28) -> int:
    """The step memory of SimpleCNN on ``side`` px images at ``batch`` (see the module docstring)."""
    torch.manual_seed(0)
    model = SimpleCNN().to(device)
    x = torch.randn(batch, 1, side, side, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if device == "cuda":
        return cuda_step_peak_bytes(model, torch.optim.Adam(model.parameters()), x, y, bf16)
    return saved_activation_bytes(model, x, y, bf16)


def precision_memory(device: str = "cpu", batch: int = 256) -> dict[str, Any]:
    """float32 vs bf16 step memory at ``batch`` and ``batch // 2``; per-sample bytes and the fit ratio.

    ``fit_ratio``: the largest bf16 batch whose memory stays within the float32 step's at ``batch``,
    over ``batch`` (``(M32 - fixed16) / per_sample16 / batch``).
    """
    out: dict[str, Any] = {"device": device, "batch": batch,
                           "what": "peak of torch.cuda.max_memory_allocated over a training step" if device == "cuda"
                           else "bytes of the tensors saved for backward (CPU: no allocator peak)"}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        full, half = step_memory(device, batch, bf16), step_memory(device, batch // 2, bf16)
        per_sample = (full - half) / (batch - batch // 2)
        out[f"{name}_bytes"], out[f"{name}_bytes_per_sample"] = full, per_sample
        out[f"{name}_fixed_bytes"] = full - per_sample * batch
    budget = out["fp32_bytes"]
    out["fit_ratio"] = (budget - out["bf16_fixed_bytes"]) / out["bf16_bytes_per_sample"] / batch
    out["bytes_ratio_fp32_over_bf16"] = out["fp32_bytes"] / out["bf16_bytes"]
    return out
