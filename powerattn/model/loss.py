"""Next-token targets and a cross-entropy that never holds [tokens, vocab] float32 logits at once.

Labels are HF-style: aligned with input_ids (labels[t] is the token AT position t) and shifted
here, so position t is trained to predict labels[t + 1]; IGNORE_INDEX (-100) is skipped. With
packed documents the last token of each document has no target (nothing across documents).
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def next_token_targets(
    labels: Tensor, cu_seqlens: Tensor | None = None, position_ids: Tensor | None = None
) -> Tensor:
    """targets[b, t] = labels[b, t + 1], IGNORE_INDEX at the end and where t + 1 starts a new document.

    Document starts come from cu_seqlens (batch 1) or, without it, from position_ids that do not
    continue by +1 (a restart at 0 for each packed document).
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        starts = cu_seqlens[1:-1].to(device=labels.device, dtype=torch.long)
        targets[0, (starts - 1).clamp(min=0)] = IGNORE_INDEX  # empty documents give start 0: harmless
    elif position_ids is not None:
        pos = position_ids.to(labels.device).expand_as(labels)
        restart = pos[:, 1:] != pos[:, :-1] + 1
        targets[:, :-1] = targets[:, :-1].masked_fill(restart, IGNORE_INDEX)
    return targets


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross_entropy(hidden @ weight.T, targets), chunk by chunk.

    Forward keeps only the per-token logsumexp; backward recomputes each chunk's logits (one extra
    lm_head matmul) instead of storing them. Logits are formed in the weight dtype and upcast to
    float32, exactly as `lm_head(hidden).float()` followed by cross_entropy.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for a in range(0, n, chunk):
            logits = (hidden[a:a + chunk] @ weight.t()).float()
            t = targets[a:a + chunk]
            lse[a:a + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t.clamp(min=0)[:, None])[:, 0]
            total += ((lse[a:a + chunk] - picked) * (t != IGNORE_INDEX)).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return total

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


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
    """Mean next-token loss of hidden [..., H] under lm_head weight [V, H] over non-ignored targets [...].

    Returns 0 (still differentiable) when every target is ignored.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    total = _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / count
