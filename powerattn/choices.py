"""Names a config chooses from, importable without torch so a bad value fails before anything heavy loads."""

# Attention backends of powerattn.ops.sparse_attention: auto picks triton on CUDA (sdpa for unpacked full
# layers), torch (the gather reference) elsewhere; flex is torch's FlexAttention.
BACKENDS = ("auto", "triton", "flex", "torch", "sdpa")

# dtype names configs, CLIs and config.json use -> the torch dtype attribute they mean (powerattn.dtypes).
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
