"""powerattn: long-context continued pretraining with PowerAttention block-sparse attention.

The public names load on first use, so `import powerattn.data.config` (config checks) does not import torch.
"""

from powerattn.lazy import lazy_exports
from powerattn.receptive_field import ReceptiveField, receptive_field  # shares its module's name: loaded now

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
__getattr__, __dir__ = lazy_exports(__name__, {
    "decode_attention": "ops", "sparse_attention": "ops",
    "BlockTables": "patterns", "Pattern": "patterns", "make_pattern": "patterns", "pattern_names": "patterns",
    "register": "patterns",
})
