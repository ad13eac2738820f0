"""A random-init HF model folder of a `configs/model/` shape, for benchmarks that need no real weights.

    python bench/make_random_hf.py --shape llama3_8b --rope llama3.1 --out /tmp/llama3_8b   # 16 GB, bf16
    python bench/make_random_hf.py --shape tiny --set num_hidden_layers=2 --out /tmp/tiny     # seconds, CPU

The folder is what a base model ships: config.json (the shape's `arch`, `--rope` context, architectures,
torch_dtype, BOS/EOS ids), safetensors shards split by huggingface_hub's split_torch_state_dict_into_shards
with model.safetensors.index.json, generation_config.json, and a byte-level BPE tokenizer.json laid out as
Llama-3's: BPE entries below, special tokens on top (<|begin_of_text|> = vocab_size - 256 for a
128256-token vocabulary), so the tokenizer covers exactly the model's vocabulary; tokenizer_config.json
names BOS/EOS. Weights are drawn as HF initialises LLaMA (normal(0, initializer_range) matrices, unit
norms, zero biases) one tensor at a time on --device (default: CUDA when present) in --dtype, one shard on
the host at a time. Everything is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from powerattn.atomic import replace_dir  # noqa: E402
from powerattn.data.filler import Filler  # noqa: E402
from powerattn.dtypes import to_dtype  # noqa: E402
from powerattn.model import LlamaConfig, LlamaForCausalLM  # noqa: E402
from powerattn.model.llama import LMHead, RMSNorm  # noqa: E402

# Context presets: the published RoPE / length settings of a model family (Llama-3.1: 8K -> 128K).
ROPE = {
    "none": {},
    "llama3.1": dict(max_position_embeddings=131072, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
DEFAULT_VOCAB = 1024  # for shapes whose arch takes the vocabulary from the tokenizer (tiny)


def shape_config(shape: str, rope: str = "none", overrides: dict | None = None) -> LlamaConfig:
    """LlamaConfig of configs/model/<shape>.yaml's `arch`, with a context preset and field overrides."""
    path = ROOT / "configs" / "model" / f"{shape}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SystemExit(f"error: --shape {shape!r}: no {path}; shapes: {names}")
    arch = dict(yaml.safe_load(path.read_text()).get("arch") or {})
    values = {**arch, **ROPE[rope], **(overrides or {})}
    values["vocab_size"] = values.get("vocab_size") or DEFAULT_VOCAB
    special = num_special_tokens(values["vocab_size"])
    values.setdefault("bos_token_id", values["vocab_size"] - special)
    values.setdefault("eos_token_id", values["vocab_size"] - special + 1)
    return LlamaConfig(**values)


def num_special_tokens(vocab_size: int) -> int:
    """Llama-3 reserves its top 256 ids for special tokens; small vocabularies keep 1/16 of theirs."""
    if vocab_size < 300:
        raise SystemExit(f"error: vocab_size {vocab_size} is too small for a byte-level tokenizer (>= 300)")
    return 256 if vocab_size >= 4096 else max(2, vocab_size // 16)


def write_tokenizer(folder: Path, vocab_size: int, max_length: int) -> None:
    """tokenizer.json (byte-level BPE fitted to filler text, padded to vocab_size) + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special = num_special_tokens(vocab_size)
    bpe_size = vocab_size - special
    fitted = Tokenizer(models.BPE())
    fitted.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=min(bpe_size, 8192), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    fitted.train_from_iterator([Filler(i).text(50) for i in range(200)], trainer)
    model = json.loads(fitted.to_str())["model"]
    vocab = dict(model["vocab"])
    # Entries no merge produces, so the special tokens land where the model's vocabulary puts them.
    for i in range(len(vocab), bpe_size):
        vocab[f"<|unused_bpe_{i}|>"] = i
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = [BOS, EOS] + [f"<|reserved_special_token_{i}|>" for i in range(special - 2)]
    tok.add_special_tokens(names)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size and tok.token_to_id(BOS) == bpe_size
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bpe_size)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": False,
              "model_max_length": max_length, "tokenizer_class": "PreTrainedTokenizerFast",
              "clean_up_tokenization_spaces": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def parameter_specs(config: LlamaConfig) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Meta tensors of every HF parameter (a tied lm_head is the embedding, listed once) and their init."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, init_weights=False)
    specs, init = {}, {}
    for module_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{attr}"
            if isinstance(module, LMHead) and config.tie_word_embeddings:
                continue
            specs[name] = p
            init[name] = "ones" if isinstance(module, RMSNorm) else "zeros" if attr == "bias" else "normal"
            assert isinstance(module, (RMSNorm, nn.Linear, nn.Embedding, LMHead)), name
    return specs, init


def write_weights(folder: Path, config: LlamaConfig, dtype: torch.dtype, device: torch.device, seed: int,
                  max_shard_size: str) -> tuple[int, int]:
    """Safetensors shards (+ index) of random weights; returns (parameters, bytes)."""
    specs, init = parameter_specs(config)
    meta = {name: torch.empty(p.shape, dtype=dtype, device="meta") for name, p in specs.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    order = {name: i for i, name in enumerate(specs)}
    for file, names in split.filename_to_tensors.items():
        tensors = {}
        for name in names:
            t = torch.empty(meta[name].shape, dtype=dtype, device=device)
            if init[name] == "normal":
                # One generator per tensor: the values do not depend on how the folder is sharded.
                gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + order[name])
                t.normal_(0.0, config.initializer_range, generator=gen)
            else:
                t.fill_(1.0 if init[name] == "ones" else 0.0)
            tensors[name] = t.cpu()
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    if split.is_sharded:
        index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    params = sum(t.numel() for t in meta.values())
    return params, params * dtype.itemsize


def make_random_hf(out: str | os.PathLike, shape: str, rope: str = "none", overrides: dict | None = None,
                   dtype: str = "bfloat16", device: str | None = None, seed: int = 0,
                   max_shard_size: str = "5GB", force: bool = False) -> dict:
    """Write the folder (see the module docstring); returns a small report (sizes, seconds)."""
    start = time.perf_counter()
    out = Path(out).resolve()
    if out.exists() and not force:
        raise SystemExit(f"error: {out} exists (pass --force to replace it)")
    config = shape_config(shape, rope, overrides)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hf = config.to_hf_dict()
        hf.update(architectures=["LlamaForCausalLM" if config.model_type == "llama" else
                                 {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.model_type]],
                  torch_dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, indent=2))
        write_tokenizer(tmp, config.vocab_size, config.max_position_embeddings)
        params, size = write_weights(tmp, config, to_dtype(dtype), dev, seed, max_shard_size)
        tmp.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
        for f in tmp.iterdir():
            f.chmod(0o644)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "shape": shape, "rope": rope, "params": params, "bytes": size, "dtype": dtype,
            "device": str(dev), "shards": len(list(out.glob("*.safetensors"))),
            "seconds": round(time.perf_counter() - start, 2)}


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", required=True, help="a configs/model/ name (its arch), e.g. llama3_8b, tiny")
    p.add_argument("--out", required=True, help="the folder to write (must not exist unless --force)")
    p.add_argument("--rope", choices=sorted(ROPE), default="none", help="context preset (default: the arch's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="LlamaConfig field override, value as JSON (e.g. num_hidden_layers=2); repeatable")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default=None, help="where weights are drawn (default: cuda if present, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = _value(value)
    report = make_random_hf(args.out, args.shape, args.rope, overrides, args.dtype, args.device, args.seed,
                            args.max_shard_size, args.force)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
