"""Config mistakes fail with one line naming the key, before any process, folder or weights: a seeded fuzz
of the default config (wrong types, negative and zero sizes, nulls, unknown keys and groups, lengths that
do not fit the batch, process counts sequence parallelism cannot split) through the checks train.py runs
first (`preflight`), and the user errors of the CLI (missing model folder, tokenizer, data path).

Unknown groups and keys without `+` are rejected by Hydra itself, with its own few lines (no traceback).
"""

import os
import random
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from train_helpers import ENV, ROOT, one_line_error, run

from powerattn.training.config import ConfigError
from powerattn.training.run import preflight

CONFIGS = ROOT / "configs"
# Values that are sizes: zero is as wrong as negative.
SIZES = ("batch.tokens_per_step", "batch.micro_batch_tokens", "curriculum.stages.0.seq_len",
         "curriculum.stages.1.steps", "checkpoint.keep_last", "pattern.block_size", "model.arch.hidden_size",
         "model.arch.num_hidden_layers", "model.arch.num_attention_heads", "model.arch.intermediate_size",
         "model.loss_chunk_size", "max_nonfinite_in_row", "data.num_proc", "final_eval.samples",
         "data.synthetic.num_docs", "parallel.sequence_parallel_size", "model.arch.max_position_embeddings",
         "optim.lr")
GROUPS = ("model", "pattern", "curriculum", "data", "deepspeed", "optim", "logger", "+experiment")
# Free-form sections (DeepSpeed's own settings) and interpolated or unchecked strings are not fuzzed.
SKIP = ("hydra.", "deepspeed.", "output_dir", "data.seq_len", "run_name", "logger.project", "data.cache_dir")
# Keys that take values of several types (a schedule name or layer list, true or a layer list).
UNTYPED = ("pattern.schedule", "model.activation_checkpointing", "model.rope_scaling")


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _leaves(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            yield from _leaves(v, key)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, item in enumerate(v):
                yield from _leaves(item, f"{key}.{i}")
        elif not key.startswith(SKIP):
            yield key, v


KINDS = ("type", "type", "negative", "zero", "null", "unknown", "group", "length", "sp")


def _mutations(n: int, seed: int = 14) -> list[tuple[str, str]]:
    """(kind, override): every one is a mistake; at least n, and at least one of every kind (a new config
    key changes the draws, which must not silently drop a kind from the fuzz)."""
    leaves = [(k, v) for k, v in _leaves(OmegaConf.to_container(_compose([]), resolve=False)) if v is not None]
    rng = random.Random(seed)
    out = []
    for _ in range(100 * n):
        if len(out) >= n and {k for k, _ in out} == set(KINDS):
            break
        key, value = rng.choice(leaves)
        kind = rng.choice(KINDS)
        if kind == "type" and key not in UNTYPED:
            bad = "[1]" if isinstance(value, str) else rng.choice(["abc", "[1]"]) if not isinstance(value, list) \
                else "abc"
            out.append((kind, f"{key}={bad}"))
        elif kind == "negative" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((kind, f"{key}={-3 if isinstance(value, int) else -1.5}"))
        elif kind == "zero":
            out.append((kind, f"{rng.choice(SIZES)}=0"))
        elif kind == "null" and not isinstance(value, list) and key not in UNTYPED:
            out.append((kind, f"{key}=null"))
        elif kind == "unknown":
            section = key.rsplit(".", 1)[0] + "." if "." in key else ""
            out.append((kind, f"+{section}{key.rsplit('.', 1)[-1]}x=1"))
        elif kind == "group":
            out.append((kind, f"{rng.choice(GROUPS)}=nope{len(out)}"))
        elif kind == "length":
            out.append((kind, f"curriculum.stages.{rng.randrange(2)}.seq_len={rng.choice([100, 1000, 3000, 777])}"))
        elif kind == "sp":
            out.append((kind, f"parallel.sequence_parallel_size={rng.choice([3, 5, 7])}"))
    return out


@pytest.fixture
def one_process(monkeypatch, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    return tmp_path / "run"


@pytest.mark.parametrize("kind, override", _mutations(48))
def test_a_mutated_config_fails_in_one_line_naming_the_key(kind, override, one_process):
    try:
        preflight(_compose([override, f"output_dir={one_process}"]))
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message and len(message) < 600, message
        key = override.lstrip("+").split("=")[0]
        parts = key.replace(".0", "[0]").replace(".1", "[1]").split(".")
        assert parts[-1].split("[")[0].rstrip("x") in message or ".".join(parts[:-1]) in message, message
    except HydraException as e:  # Hydra's own composition errors (unknown group, key without +, type merge)
        assert kind in ("group", "type", "unknown", "null"), f"{override}: {e}"
    else:
        pytest.fail(f"{override} ({kind}) was accepted")
    assert not one_process.exists()


def test_the_fuzz_covers_every_kind():
    kinds = {k for k, _ in _mutations(48)}
    assert kinds == set(KINDS)


@pytest.mark.slow
def test_cli_user_errors_are_one_line_before_anything_exists(tmp_path):
    """Each run stops in seconds (no process group, no data, no weights) and creates no folder."""
    out = tmp_path / "run"
    tokenizer = tmp_path / "tok.model"
    cases = [
        # (extra env, overrides, what the line says)
        ({"POWERATTN_MODELS": str(tmp_path / "models"), "WORLD_SIZE": "8"}, ["+experiment=llama_128k"],
         f"model.path: no folder at '{tmp_path}/models/Llama-2-7b-hf'; download the HF model there"),
        ({}, [f"data.tokenizer={tokenizer}"], f"data.tokenizer: nothing at '{tokenizer}'"),
        ({"WORLD_SIZE": "3"}, ["parallel.sequence_parallel_size=2"],
         "parallel.sequence_parallel_size=2 does not divide the 3 process(es) launched; launch a multiple of 2"),
        ({}, ["optim.lr=abc"], "optim.lr: Value 'abc' of type 'str' could not be converted to Float"),
    ]
    for env, overrides, expected in cases:
        start = time.time()
        proc = run([sys.executable, "train.py", *overrides, f"output_dir={out}"], env={**ENV, **env}, ok=False)
        line = one_line_error(proc)
        assert expected in line, line
        assert time.time() - start < 20 and not out.exists()
    # A local data path that does not exist.
    from powerattn.data import default_tokenizer

    tok = default_tokenizer(tmp_path / "cache")
    proc = run([sys.executable, "train.py", f"data.tokenizer={tok.path}", f"output_dir={out}",
                f"data.sources=[{{path: {tmp_path}/corpus/*.jsonl}}]"], ok=False)
    assert one_line_error(proc).startswith("error: data.sources[0].path: ") and not out.exists()
    # Hydra's rejection of an unknown key: its own lines, no traceback.
    proc = run([sys.executable, "train.py", "optim.lrr=1", f"output_dir={out}"], ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "optim.lrr" in proc.stderr
    assert not out.exists() and os.path.isdir(ROOT)


@pytest.mark.parametrize("group", ["default", "slimpajama"])
def test_every_data_setting_can_be_overridden_without_plus(group):
    """`data.num_proc=4` once needed `+`: the group files must name every DataConfig field they accept."""
    from dataclasses import fields

    from powerattn.data.config import DataConfig, SyntheticConfig

    cfg = _compose([f"data={group}"]).data
    set_by_train = {"seq_len"}  # the curriculum's stage length
    optional = {"synthetic"} if group != "default" else set()
    assert {f.name for f in fields(DataConfig)} - set_by_train - optional <= set(cfg)
    if group == "default":
        assert {f.name for f in fields(SyntheticConfig)} <= set(cfg.synthetic)
