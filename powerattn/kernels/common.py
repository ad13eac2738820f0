"""What the kernel files share: constants, the program-to-work mapping, and the TMA row view of [b, s, h, d]."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2_E = 1.4426950408889634  # log2(e): the kernels use exp2, so scores are scaled by it once
MIN_DOT = 16  # tl.dot needs every dimension of its operands >= 16
INTERPRETER_TILE = 16  # the smallest legal tile keeps the CPU interpreter fast
HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of two: head_dim is an arange length in every kernel


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied only if needed: tensor descriptors view [b, s, h, d] as [b * s, h * d]."""
    return t if t.is_contiguous() else t.contiguous()


def rows_descriptor(t: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """TMA descriptor over [b, s, h, d] seen as [b * s, h * d], loading [block_rows, d] tiles of one head."""
    b, s, h, d = t.shape
    return TensorDescriptor.from_tensor(t.view(b * s, h * d), block_shape=[block_rows, d])


@triton.jit
def sequence_bounds(cu_seqlens, seq, seq_len, VARLEN: tl.constexpr):
    """(batch, first row in the [b * s, h * d] view, start offset, length) of sequence/document `seq`.

    Batch and start are int64: batch * stride and position * stride pass 2^31 at long context.
    """
    if VARLEN:  # packed documents of one batch row
        row0 = tl.load(cu_seqlens + seq)
        seqlen = tl.load(cu_seqlens + seq + 1) - row0
        return tl.zeros([], dtype=tl.int64), row0, row0.to(tl.int64), seqlen
    else:
        return seq.to(tl.int64), seq * seq_len, tl.zeros([], dtype=tl.int64), seq_len


@triton.jit
def query_tile_program(n_heads, GROUP: tl.constexpr):
    """(query tile, sequence * n_kv_heads + kv head, head) of this program in the forward / dQ grid.

    Axis 0 runs over (query tile, head of the GQA group) with the group's heads adjacent, so the
    programs sharing a K/V tile run together and it comes from L2 once per group; query tiles
    are handed out from the end of the sequence, longest rows first.
    """
    pid_m = tl.num_programs(0) // GROUP - 1 - tl.program_id(0) // GROUP
    pid_bh = tl.program_id(1)
    head = (pid_bh % (n_heads // GROUP)) * GROUP + tl.program_id(0) % GROUP
    return pid_m, pid_bh, head
