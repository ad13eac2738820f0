"""HF transformers as the independent reference: load HF checkpoints, save ones HF loads, same logits;
RoPE scaling variants; sharding; context extension; bad checkpoints raise the documented errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import powerattn
from powerattn.model import CheckpointError, from_pretrained, hf_io, load_config

transformers = pytest.importorskip("transformers")

V = 96
TINY = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def hf_model(kind: str, **overrides):
    """A tiny random transformers model with weights large enough for attention and RoPE to matter."""
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    kw = dict(TINY)
    if kind == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    model = model_cls(cfg_cls(**kw)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def save_hf(model, path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("kind,overrides", [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("mistral", {"head_dim": 32}),
])
def test_hf_checkpoint_loads_with_equal_logits(tmp_path, kind, overrides):
    ref = hf_model(kind, **overrides)
    ours = from_pretrained(save_hf(ref, tmp_path / "hf"))
    ids = torch.randint(0, V, (2, 57))
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_loss_and_gradients_match_hf(tmp_path, kind):
    ref = hf_model(kind, tie_word_embeddings=(kind == "qwen2"))
    ours = from_pretrained(save_hf(ref, tmp_path / "hf"), loss_chunk_size=16)
    ids = torch.randint(0, V, (2, 45))
    labels = ids.clone()
    labels[:, :5] = -100
    ref_loss = ref(ids, labels=labels).loss
    loss = ours(ids, labels=labels)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    ref_loss.backward()
    loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


ROPE_CASES = {
    "theta": dict(rope_theta=500.0),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=32),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                               "beta_fast": 16.0}, rope_theta=1000.0),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                   rope_theta=500.0),
}


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_scaling_matches_hf(tmp_path, case):
    ref = hf_model("llama", **ROPE_CASES[case])
    ours = from_pretrained(save_hf(ref, tmp_path / "hf"))
    ids = torch.randint(0, V, (1, 60))  # > max_position_embeddings for dynamic: the base really changes
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)


def test_old_and_new_config_fields_read_the_same(tmp_path):
    ref = hf_model("llama", rope_theta=2000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    path = save_hf(ref, tmp_path / "hf")
    new = load_config(path)
    raw = json.load(open(os.path.join(path, "config.json")))
    raw.pop("rope_parameters", None)
    raw.update(rope_theta=2000.0, rope_scaling={"type": "linear", "factor": 2.0})  # transformers 4.x style
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    old = load_config(path)
    assert (old.rope_theta, old.rope_scaling) == (new.rope_theta, new.rope_scaling) == (
        2000.0, {"rope_type": "linear", "factor": 2.0})
    ids = torch.randint(0, V, (1, 40))
    ours = from_pretrained(path)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_our_save_loads_in_hf_and_round_trips_sharded(tmp_path, kind):
    ref = hf_model(kind, tie_word_embeddings=(kind == "qwen2"))
    src = save_hf(ref, tmp_path / "hf")
    with open(os.path.join(src, "tokenizer.model"), "wb") as f:
        f.write(b"not really a tokenizer")
    pat = powerattn.make_pattern("power", block_size=16, window=2)
    ours = from_pretrained(src, pattern=pat, attention_schedule=[1])
    ids = torch.randint(0, V, (2, 50))
    expected = our_logits(ours, ids)

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    ours.save_pretrained(single)
    ours.save_pretrained(sharded, max_shard_size="30KB")
    assert sorted(os.listdir(single)) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.model"]
    shard_files = [f for f in os.listdir(sharded) if f.startswith("model-")]
    assert len(shard_files) > 2 and os.path.exists(sharded / "model.safetensors.index.json")
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or ".old-" in f]

    for out in (single, sharded):
        back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        torch.testing.assert_close(hf_logits(back, ids), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)
        again = from_pretrained(out)  # pattern and schedule come back from config.json
        assert again.pattern == pat and again.full_attention_layers == (1,)
        torch.testing.assert_close(our_logits(again, ids), expected, atol=0, rtol=0)


def test_shards_hold_each_tensor_once_within_the_limit_in_the_dtype_written(tmp_path):
    from powerattn.model import LlamaConfig, LlamaForCausalLM

    ours = LlamaForCausalLM(LlamaConfig(**TINY))
    limit = 20_000
    ours.save_pretrained(tmp_path / "out", max_shard_size=limit, dtype=torch.float16)
    with open(tmp_path / "out" / "model.safetensors.index.json") as f:
        index = json.load(f)
    shards = {}
    for file in sorted(set(index["weight_map"].values())):
        shards[file] = load_file(tmp_path / "out" / file)
        assert all(t.dtype == torch.float16 for t in shards[file].values())
        nbytes = [t.numel() * t.element_size() for t in shards[file].values()]
        assert sum(nbytes) <= limit or len(nbytes) == 1, (file, nbytes)  # only a lone big tensor may exceed it
    n = len(shards)
    assert sorted(shards) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    names = {name: file for file, tensors in shards.items() for name in tensors}
    assert names == index["weight_map"] and set(names) == {name for name, _ in ours.named_parameters()}
    total = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_model_built_from_scratch_saves_hf_loadable(tmp_path, model_type):
    from powerattn.model import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(model_type=model_type, tie_word_embeddings=True, initializer_range=0.2, **TINY)
    ours = LlamaForCausalLM(cfg)
    ours.save_pretrained(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    ids = torch.randint(0, V, (2, 30))
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(back, ids), atol=1e-4, rtol=1e-4)


def test_save_in_bfloat16_and_load_dtype(tmp_path):
    ours = from_pretrained(save_hf(hf_model("llama"), tmp_path / "hf"), dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ours.save_pretrained(tmp_path / "out")
    assert json.load(open(tmp_path / "out" / "config.json"))["torch_dtype"] == "bfloat16"
    again = from_pretrained(tmp_path / "out")  # dtype defaults to config.json's
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}


def test_extended_context_is_saved_and_hf_agrees(tmp_path):
    ours = from_pretrained(save_hf(hf_model("llama"), tmp_path / "hf"))
    ours.extend_context(256, rope_theta=40000.0, rope_scaling="yarn")
    ours.save_pretrained(tmp_path / "long")
    saved = json.load(open(tmp_path / "long" / "config.json"))
    assert saved["max_position_embeddings"] == 256
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert saved["rope_scaling"] == yarn
    assert saved["rope_parameters"]["rope_theta"] == 40000.0 and saved["rope_theta"] == 40000.0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "long", dtype=torch.float32).eval()
    ids = torch.randint(0, V, (1, 100))
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(back, ids), atol=1e-4, rtol=1e-4)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    ours = from_pretrained(save_hf(hf_model("llama"), tmp_path / "hf"))
    ours.save_pretrained(tmp_path / "out")
    before = sorted(os.listdir(tmp_path / "out"))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ours.save_pretrained(tmp_path / "out", max_shard_size="30KB")
    with pytest.raises(OSError, match="disk full"):
        ours.save_pretrained(tmp_path / "new")
    assert sorted(os.listdir(tmp_path / "out")) == before  # the previous save is untouched
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]  # no half-written folder or temp left behind


def _rewrite_weights(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_bad_checkpoints_raise_documented_errors(tmp_path):
    ref = hf_model("llama")
    good = save_hf(ref, tmp_path / "good")

    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")

    missing = save_hf(ref, tmp_path / "missing")
    _rewrite_weights(missing, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: \['model.layers.1.mlp.up_proj.weight'\]"):
        from_pretrained(missing)

    shape = save_hf(ref, tmp_path / "shape")
    _rewrite_weights(shape, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight: checkpoint \(65,\) vs model \(64,\)"):
        from_pretrained(shape)

    extra = save_hf(ref, tmp_path / "extra")
    _rewrite_weights(extra, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: \['model.layers.2.mlp.up_proj.weight'\]"):
        from_pretrained(extra)

    no_config = save_hf(ref, tmp_path / "no_config")
    os.remove(os.path.join(no_config, "config.json"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(no_config)

    no_weights = save_hf(ref, tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_pretrained(no_weights)

    gpt2 = save_hf(ref, tmp_path / "gpt2")
    raw = json.load(open(os.path.join(gpt2, "config.json")))
    with open(os.path.join(gpt2, "config.json"), "w") as f:
        json.dump({**raw, "model_type": "gpt2"}, f)
    with pytest.raises(CheckpointError, match="model_type 'gpt2'.*LLaMA-family"):
        from_pretrained(gpt2)

    typo = save_hf(ref, tmp_path / "typo")
    with open(os.path.join(typo, "config.json"), "w") as f:
        json.dump({**raw, "rope_scaling": {"rope_type": "yarn", "factr": 4.0}}, f)
    with pytest.raises(CheckpointError, match=r"missing \['factor'\].*unknown keys \['factr'\]"):
        from_pretrained(typo)

    sharded = tmp_path / "sharded"
    from_pretrained(good).save_pretrained(sharded, max_shard_size="30KB")
    second = sorted(f for f in os.listdir(sharded) if f.startswith("model-"))[1]
    os.remove(sharded / second)
    with pytest.raises(FileNotFoundError, match=second):
        from_pretrained(sharded)
