"""HF model folders in and out: config.json + safetensors (single or sharded with an index).

Loading checks every tensor name and shape against the config before reading any weights, then
fills a meta-device model (no random copy first) or, under ZeRO-3, each rank's own partition.
Saving writes into a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections import defaultdict

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from powerattn.atomic import replace_dir
from powerattn.dtypes import to_dtype
from powerattn.manifest import LEVELS, ManifestError, publish_permissions, verify_if_sealed
from powerattn.model.config import CheckpointError, LlamaConfig, load_config, parse_size
from powerattn.model.llama import LlamaForCausalLM
from powerattn.model.zero3 import (
    full_shape,
    gathered,
    init_context,
    is_zero3,
    local_range,
    rank,
    write_gathered,
    write_partition,
    zero3_enabled,
)
from powerattn.patterns import Pattern, pattern_from_dict

WEIGHTS_NAME = "model.safetensors"
SHARD_NAMES = "model{suffix}.safetensors"  # WEIGHTS_NAME, or model-00001-of-00003.safetensors ... when sharded
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_NOT_WEIGHTS = re.compile(r"rotary_emb\.inv_freq$")  # buffers that old transformers versions saved


def _resolve_dtype(dtype: torch.dtype | str | None, config: LlamaConfig) -> torch.dtype:
    """dtype argument, else config.json's torch_dtype / dtype, else float32."""
    if dtype is None:
        dtype = config.hf_extra.get("torch_dtype") or config.hf_extra.get("dtype") or "float32"
    return to_dtype(dtype)


def weight_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index json or the single model.safetensors."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        absent = sorted({f for f in files.values() if not os.path.isfile(f)})
        if absent:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {absent}")
        return files
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".safetensors")))
    hint = f"; found {others} (convert .bin checkpoints to safetensors first)" if others else ""
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path!r}{hint}")


def _by_file(files: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for name, file in files.items():
        grouped[file].append(name)
    return grouped


def _tensor_shapes(files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers (no tensor data is read)."""
    shapes = {}
    for file, names in _by_file(files).items():
        with safe_open(file, framework="pt") as f:
            present = set(f.keys())
            lost = sorted(set(names) - present)
            if lost:
                raise CheckpointError(f"{file} lacks tensors its index assigns to it: {_short(lost)}")
            for name in names:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _short(items: list, n: int = 20) -> str:
    return str(items[:n]) + (f" ... and {len(items) - n} more" if len(items) > n else "")


def _check_tensors(path: str, model: LlamaForCausalLM, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Names to load; raises CheckpointError listing missing, unexpected and mis-shaped tensors."""
    expected = {name: tuple(full_shape(p)) for name, p in model.named_parameters()}
    skippable = {n for n in shapes if _NOT_WEIGHTS.search(n)}
    if model.config.tie_word_embeddings:
        skippable.add("lm_head.weight")  # some tied checkpoints store it anyway; the embedding wins
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - skippable)
    mismatched = [f"{n}: checkpoint {shapes[n]} vs model {expected[n]}"
                  for n in sorted(set(shapes) & set(expected)) if shapes[n] != expected[n]]
    if missing or unexpected or mismatched:
        parts = [f"checkpoint {path!r} does not match its config.json ({model.config.model_type}, "
                 f"{model.config.num_hidden_layers} layers)"]
        if missing:
            parts.append(f"missing tensors: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_short(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_short(mismatched)}")
        raise CheckpointError("; ".join(parts))
    return [n for n in shapes if n in expected]


def _saved_attention(config: LlamaConfig, pattern: Pattern | None, schedule):
    """Without an explicit pattern, reuse the one a powerattn-saved config.json records."""
    saved = config.hf_extra.get("powerattn") or {}
    if pattern is None and saved.get("pattern"):
        pattern = pattern_from_dict(saved["pattern"])
        if schedule is None:
            schedule = saved.get("full_attention_layers") or None
    return pattern, schedule


def from_pretrained(
    path: str | os.PathLike, pattern: Pattern | None = None, dtype: torch.dtype | str | None = None,
    attention_schedule: str | list[int] | None = None, device: torch.device | str | None = None,
    backend: str = "auto", deepspeed_config: dict | str | None = None, verify: str = "hash", **config_overrides,
) -> LlamaForCausalLM:
    """Load an HF LLaMA-family folder into LlamaForCausalLM.

    pattern: sparsity of every layer (None: the pattern recorded by a powerattn save, else full
    attention); attention_schedule: which layers stay full (see resolve_attention_schedule).
    dtype: default config.json's torch_dtype. device: where weights land (default CPU).
    deepspeed_config: a ZeRO-3 config (dict or JSON path) builds the model under
    deepspeed.zero.Init and each rank reads only its own partition (placed where the config says;
    `device` is ignored); other stages load normally. Every rank must call it then.
    verify: a folder sealed by a manifest (a training checkpoint's model/) is checked against it first:
    "hash" (every byte, sha256), "size" (file sizes only) or "none"; unsealed folders are not checked.
    config_overrides: LlamaConfig fields such as activation_checkpointing=True, loss_chunk_size=4096.
    Raises FileNotFoundError (no folder, config.json or weights) and CheckpointError (damaged per its
    manifest, not LLaMA-family, missing/unexpected tensors, shape mismatches), before reading any weights.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    if verify not in LEVELS:
        raise ValueError(f"verify={verify!r} is not one of {LEVELS}")
    try:
        verify_if_sealed(path, verify)
    except ManifestError as e:
        raise CheckpointError(str(e)) from None
    config = load_config(path, **config_overrides)
    dtype = _resolve_dtype(dtype, config)
    pattern, attention_schedule = _saved_attention(config, pattern, attention_schedule)
    files = weight_files(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, pattern, attention_schedule, backend, init_weights=False)
    names = set(_check_tensors(path, model, _tensor_shapes(files)))
    if zero3_enabled(deepspeed_config):
        model = _load_zero3(config, files, names, dtype, deepspeed_config, pattern, attention_schedule,
                            backend)
    else:
        _load_into_meta(model, files, names, dtype, torch.device(device or "cpu"))
    model.source_dir = path
    return model


def _load_into_meta(model: LlamaForCausalLM, files: dict[str, str], names: set[str], dtype: torch.dtype,
                    device: torch.device) -> None:
    for file, file_names in _by_file(files).items():
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in file_names:
                if name not in names:
                    continue
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                setattr(module, attr, nn.Parameter(f.get_tensor(name).to(dtype), requires_grad=True))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # _check_tensors makes this unreachable; kept so a bug cannot leave meta tensors behind
        raise CheckpointError(f"parameters not loaded: {_short(left)}")


def _load_zero3(config, files, names, dtype, ds_config, pattern, schedule, backend) -> LlamaForCausalLM:
    with init_context(ds_config, dtype):
        model = LlamaForCausalLM(config, pattern, schedule, backend, init_weights=False)
    params = dict(model.named_parameters())
    got = {p.dtype for p in params.values()}
    if got != {dtype}:
        raise RuntimeError(f"deepspeed.zero.Init created {got} parameters, not {dtype}: make the DeepSpeed "
                           "config's bf16/fp16 sections agree with the requested dtype")
    for file, file_names in _by_file(files).items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in file_names:
                if name not in names:
                    continue
                param, span = params[name], local_range(params[name])
                if span is None:
                    write_gathered(param, f.get_tensor(name).to(dtype))
                else:
                    write_partition(param, _read_flat(f.get_slice(name), param.ds_shape, *span).to(dtype))
    return model


def _read_flat(tensor_slice, shape: torch.Size, start: int, count: int) -> torch.Tensor:
    """Flattened elements [start, start + count) of a safetensors tensor, reading only the rows they span."""
    if count == 0:
        return torch.empty(0)
    if len(shape) < 2:
        return tensor_slice[start:start + count]
    row = shape[1:].numel()
    first, last = start // row, -(-(start + count) // row)
    return tensor_slice[first:last].reshape(-1)[start - first * row:start - first * row + count]


def _config_json(model: LlamaForCausalLM, dtype_name: str) -> dict:
    out = model.config.to_hf_dict()
    out.setdefault("architectures", [ARCHITECTURES[model.config.model_type]])
    out["torch_dtype"] = dtype_name
    if "dtype" in out:
        out["dtype"] = dtype_name
    # The model ran its pattern, never a window: say so, or transformers' MistralConfig assumes 4096 tokens.
    if model.config.model_type == "mistral":
        out["sliding_window"] = None
    if out.get("use_sliding_window"):
        out["use_sliding_window"] = False
    pattern = {"name": model.pattern.name, **dataclasses.asdict(model.pattern)}
    out["powerattn"] = {"pattern": pattern, "full_attention_layers": list(model.full_attention_layers)}
    return out


def save_pretrained(model: LlamaForCausalLM, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB",
                    tokenizer_dir: str | None = None, dtype: torch.dtype | None = None) -> None:
    """Write config.json, safetensors shards (+ index) and tokenizer files as an HF folder.

    Written to a temporary sibling folder and renamed to out_dir when complete (an existing out_dir
    is replaced). tokenizer_dir defaults to the folder the model was loaded from. Under ZeRO-3
    every rank must call this: parameters are gathered one at a time and rank 0 writes.
    """
    limit = parse_size(max_shard_size)
    out_dir = os.path.abspath(os.fspath(out_dir))
    params = dict(model.named_parameters())  # a tied lm_head is listed once, as the embedding
    zero = any(is_zero3(p) for p in params.values())
    writer = rank() == 0
    tokenizer_src = tokenizer_dir or model.source_dir
    if tokenizer_dir is not None and not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir!r} does not exist")
    first_dtype = dtype or next(iter(params.values())).dtype
    # Planned on meta stand-ins of the full shape (not a ZeRO-3 partition) in the dtype written.
    meta = {name: torch.empty(full_shape(p), dtype=dtype or p.dtype, device="meta") for name, p in params.items()}
    split = split_torch_state_dict_into_shards(meta, filename_pattern=SHARD_NAMES, max_shard_size=limit)
    tmp = None
    if writer:
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=os.path.dirname(out_dir))
    try:
        for file, names in split.filename_to_tensors.items():
            tensors = {}
            for name in names:
                p = params[name]
                with gathered([p]):  # one parameter at a time: never the whole model on a rank
                    if writer:
                        tensors[name] = p.detach().to(device="cpu", dtype=dtype or p.dtype).clone()
            if writer:
                save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
                del tensors
        if writer:
            if split.is_sharded:
                index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
                with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                    json.dump(index, f, indent=2)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(_config_json(model, str(first_dtype).removeprefix("torch.")), f, indent=2)
            for name in TOKENIZER_FILES if tokenizer_src else ():
                src = os.path.join(tokenizer_src, name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, name))
            publish_permissions(tmp)  # mkdtemp makes 0700 and safetensors 0600: follow the umask instead
            replace_dir(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if zero and torch.distributed.is_initialized():
        torch.distributed.barrier()


