"""bench/make_random_hf.py: the folder loads through powerattn and transformers, the tokenizer covers the model's
vocabulary with Llama-3's special-token layout, values do not depend on sharding, and the 8B shape plans
the parameter count and shards of the real Llama-3-8B (without writing 16 GB)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_random_hf", ROOT / "bench" / "make_random_hf.py")
make_random_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_random_hf)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "tiny"
    report = make_random_hf.make_random_hf(out, "tiny", rope="llama3.1", max_shard_size="1MB", device="cpu")
    assert report["shards"] > 1 and report["params"] * 2 == report["bytes"]
    return out


def test_folder_is_a_sharded_hf_checkpoint(tiny):
    names = sorted(p.name for p in tiny.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(names)
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {n for n in names if n.endswith(".safetensors")}
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "bfloat16"
    assert config["max_position_embeddings"] == 131072
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert not any(p.name.startswith(".") for p in tiny.parent.iterdir())  # no temporary folder left


def test_loads_in_powerattn_and_transformers_with_the_same_outputs(tiny):
    transformers = pytest.importorskip("transformers")
    from powerattn.model import from_pretrained

    ours = from_pretrained(tiny, dtype=torch.float32)
    w = ours.model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.02) < 2e-3 and abs(w.mean().item()) < 1e-3
    assert torch.equal(ours.model.norm.weight, torch.ones_like(ours.model.norm.weight))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    ids = tok("The quiet river slept again. The pass key is 90210.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-4)


def test_tokenizer_matches_the_vocabulary_and_llama3_layout(tiny):
    transformers = pytest.importorskip("transformers")
    from powerattn.data.tokenizer import Tokenizer

    config = json.loads((tiny / "config.json").read_text())
    ours = Tokenizer.from_pretrained(tiny)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny)
    assert ours.vocab_size == len(theirs) == config["vocab_size"]
    special = make_random_hf.num_special_tokens(config["vocab_size"])
    assert (ours.bos_id, ours.eos_id) == (config["bos_token_id"], config["eos_token_id"])
    assert ours.bos_id == config["vocab_size"] - special and ours.add_bos
    text = "Mara carried the silver lantern across the bridge. The pass key is 90210."
    assert theirs(text).input_ids == ours.encode(text)
    assert ours.decode(ours.encode(text, bos=False)) == text


def test_values_do_not_depend_on_sharding(tiny, tmp_path):
    from safetensors.torch import load_file

    make_random_hf.make_random_hf(tmp_path / "one", "tiny", rope="llama3.1", device="cpu")
    single = load_file(tmp_path / "one" / "model.safetensors")
    sharded = {}
    for f in tiny.glob("*.safetensors"):
        sharded.update(load_file(f))
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)


def test_llama3_8b_shape_plans_the_real_checkpoint():
    from huggingface_hub import split_torch_state_dict_into_shards

    config = make_random_hf.shape_config("llama3_8b", "llama3.1")
    specs, init = make_random_hf.parameter_specs(config)
    assert sum(p.numel() for p in specs.values()) == 8_030_261_248  # Meta-Llama-3-8B's parameter count
    assert "lm_head.weight" in specs and init["model.norm.weight"] == "ones"
    meta = {n: torch.empty(p.shape, dtype=torch.bfloat16, device="meta") for n, p in specs.items()}
    assert len(split_torch_state_dict_into_shards(meta, max_shard_size="5GB").filename_to_tensors) == 4
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (128256, 128000, 128001)
    assert config.rope_theta == 500000.0 and config.rope_scaling["factor"] == 8.0


def test_cli_refuses_to_overwrite_and_names_unknown_shapes(tiny):
    def cli(*args):
        return subprocess.run([sys.executable, "bench/make_random_hf.py", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    proc = cli("--shape", "tiny", "--out", str(tiny))
    assert proc.returncode != 0 and "exists (pass --force" in proc.stderr
    proc = cli("--shape", "llama9", "--out", str(tiny.parent / "x"))
    assert proc.returncode != 0 and "llama3_8b" in proc.stderr
