"""Triton kernels for block-sparse attention (GPU; on CPU under TRITON_INTERPRET=1 for the tests).

Modules: `forward`, `backward`, `decode` (one kernel family each, with its launcher), `common`
(what they share), `tables` (cached index tables and dK/dV schedule), `tuning` (launch configs),
`custom_ops` (torch custom ops with autograd, and the entry points below).
"""

from powerattn.kernels.custom_ops import triton_attention, triton_decode, triton_supports

__all__ = ["triton_attention", "triton_decode", "triton_supports"]
