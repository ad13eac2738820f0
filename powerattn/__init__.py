"""powerattn: long-context continued pretraining with PowerAttention block-sparse attention."""

from powerattn.ops import decode_attention, sparse_attention
from powerattn.patterns import BlockTables, Pattern, make_pattern, pattern_names, register
from powerattn.receptive_field import ReceptiveField, receptive_field

__all__ = [
    "BlockTables",
    "Pattern",
    "ReceptiveField",
    "decode_attention",
    "make_pattern",
    "pattern_names",
    "receptive_field",
    "register",
    "sparse_attention",
]
__version__ = "0.1.0"
