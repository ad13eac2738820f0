"""A next-token cross-entropy that never holds [tokens, vocab] float32 logits at once.

Targets come from `powerattn.targets.next_token_targets` (already shifted). The loss is returned as a
`TokenLoss`: the summed token loss and the number of targets it sums over, so a caller that averages
over more tokens (micro-batches, ranks, Ulysses slices) never recounts them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from powerattn.targets import IGNORE_INDEX, next_token_targets

__all__ = ["IGNORE_INDEX", "TokenLoss", "chunked_cross_entropy", "chunked_nll", "next_token_targets"]


class TokenLoss(NamedTuple):
    """Summed next-token loss (float32 scalar, differentiable) over `num_targets` scored targets.

    A tuple, so ZeRO-3's module hooks see the tensors inside (they skip other objects).
    """

    loss_sum: Tensor
    num_targets: Tensor  # int64 scalar

    def mean(self) -> Tensor:
        """The mean token loss; 0 (still differentiable) when nothing is scored."""
        return self.loss_sum / self.num_targets.clamp(min=1)


def chunked_nll(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """(nll, lse): float32 [N] negative log-likelihood of targets [N] under logits hidden [N, H] @ weight.T
    (0 where ignored) and the logsumexp of each row, chunk rows at a time.

    Logits are formed in the weight dtype and upcast to float32, as `lm_head(hidden).float()` does.
    """
    n = hidden.shape[0]
    nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for a in range(0, n, chunk):
        logits = (hidden[a:a + chunk] @ weight.t()).float()
        t = targets[a:a + chunk]
        lse[a:a + chunk] = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, t.clamp(min=0)[:, None])[:, 0]
        nll[a:a + chunk] = (lse[a:a + chunk] - picked) * (t != IGNORE_INDEX)
    return nll, lse


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross_entropy(hidden @ weight.T, targets), chunk by chunk.

    Forward keeps only the per-token logsumexp; backward recomputes each chunk's logits (one extra
    lm_head matmul) instead of storing them.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        nll, lse = chunked_nll(hidden, weight, targets, chunk)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return nll.sum()

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk, n = ctx.chunk, hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Several chunks sum their weight gradients in float32 (one chunk: same rounding as autograd).
        grad_w = None
        if need_w:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32 if n > chunk else weight.dtype,
                                 device=weight.device)
        for a in range(0, n, chunk):
            h, t = hidden[a:a + chunk], targets[a:a + chunk]
            valid = t != IGNORE_INDEX
            p = torch.exp((h @ weight.t()).float() - lse[a:a + chunk, None])
            p[torch.arange(len(t), device=p.device), t.clamp(min=0)] -= 1.0
            p = (p * (valid[:, None] * grad_total)).to(hidden.dtype)
            if need_h:
                grad_h[a:a + chunk] = p @ weight
            if need_w:
                grad_w += p.t() @ h
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> TokenLoss:
    """Next-token loss of hidden [..., H] under lm_head weight [V, H] over non-ignored targets [...]."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    total = _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)
    return TokenLoss(total, (targets != IGNORE_INDEX).sum())
