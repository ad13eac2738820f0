"""The decoder's non-attention ops (RMSNorm, RoPE, SwiGLU, lm_head + cross-entropy), each eager or as
Liger-Kernel's fused Triton kernels, chosen per call by `LlamaConfig.fused_ops`:

- "auto": Liger for CUDA tensors when liger_kernel is installed, else eager;
- "liger": Liger, and a clear error for tensors off CUDA;
- "none": eager.

Deciding per call from the input's device lets a model built on the CPU or the meta device pick the
kernels up once it moves to a GPU; CPU runs never import Liger.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from powerattn.model.config import FUSED_OPS
from powerattn.model.loss import TokenLoss, chunked_cross_entropy
from powerattn.model.rope import apply_rope
from powerattn.targets import IGNORE_INDEX


@functools.cache
def liger_available() -> bool:
    """Whether liger_kernel is installed (found once; imported at the first fused call)."""
    return importlib.util.find_spec("liger_kernel") is not None


def enabled(fused_ops: str, x: Tensor) -> bool:
    """Whether an op set to `fused_ops` runs Liger's kernel on x."""
    if fused_ops == "none":
        return False
    if fused_ops == "auto":
        return x.is_cuda and liger_available()
    if fused_ops != "liger":
        raise ValueError(f"fused_ops {fused_ops!r} is not one of {FUSED_OPS}")
    if not x.is_cuda:
        raise ValueError(f"fused_ops='liger' runs Liger-Kernel's Triton kernels on CUDA, but the model runs on "
                         f"{x.device}; use fused_ops='auto' (eager off CUDA) or 'none'")
    if not liger_available():
        raise ValueError("fused_ops='liger' needs the liger-kernel package (pip install 'powerattn[fast]'); "
                         "fused_ops='auto' uses it only where it is installed")
    return True


@functools.cache
def _liger():
    from liger_kernel.transformers import functional

    return functional


def rms_norm(x: Tensor, weight: Tensor, eps: float, fused_ops: str) -> Tensor:
    """weight * x / rms(x), with 1/rms in float32 and the weight applied in x's dtype (as transformers' Llama)."""
    if enabled(fused_ops, x):
        # in_place: backward writes dX over dY, which nothing else reads (a norm's output feeds only matmuls).
        return _liger().liger_rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=True)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, fused_ops: str) -> tuple[Tensor, Tensor]:
    """q [b, s, heads, d] and k [b, s, kv_heads, d] rotated in float32 by cos/sin [b or 1, s, d // 2]
    (rotate-half layout); Liger rotates in place, one kernel for both."""
    if not enabled(fused_ops, q):
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # Liger wants [b, heads, s, d] views of a [b, s, heads, d] buffer (transformers' layout), so the
    # transposes cost nothing; rotary_dim = d says cos/sin hold each frequency once, not twice.
    q, k = _liger().liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, rotary_dim=q.shape[-1])
    return q.transpose(1, 2), k.transpose(1, 2)


def silu_mul(gate: Tensor, up: Tensor, fused_ops: str) -> Tensor:
    """SwiGLU's silu(gate) * up; Liger's backward recomputes silu and overwrites gate and up with their gradients."""
    if enabled(fused_ops, gate):
        return _liger().liger_swiglu(gate, up)
    return F.silu(gate) * up


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int,
                         fused_ops: str) -> TokenLoss:
    """Summed next-token loss of hidden [..., H] under lm_head weight [V, H] over the non-ignored targets [...],
    and their count, never holding all logits.

    Eager: chunk_size rows at a time, logits recomputed in backward (loss.chunked_cross_entropy). Liger: its
    own chunks, gradients computed during the forward (one lm_head matmul fewer), the weight's summed in
    float32 as the eager path does.
    """
    if not enabled(fused_ops, hidden):
        return chunked_cross_entropy(hidden, weight, targets, chunk_size)
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    total = _liger().liger_fused_linear_cross_entropy(
        hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum", accum_dtype=torch.float32)
    return TokenLoss(total, (targets != IGNORE_INDEX).sum())
