"""Config groups compose, experiments validate for their intended process layout, and every kind of
mistake fails fast with the offending key named."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from powerattn.training.config import ConfigError, TrainConfig, load_config
from powerattn.training.curriculum import plan_curriculum

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# experiment -> (world size, sequence-parallel size) it is written for
EXPERIMENTS = {"tiny": (1, 1), "llama_128k": (8, 8), "paper_qwen2_32k": (8, 4), "llama3_8b_128k": (8, 8),
               "pattern_study": (1, 1), "pattern_study_base": (1, 1)}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_every_experiment_composes_validates_and_plans():
    assert set(_options("experiment")) == set(EXPERIMENTS)
    for name, (world, sp) in EXPERIMENTS.items():
        cfg = load_config(_compose(f"+experiment={name}"))
        assert cfg.run_name == name and cfg.parallel.sequence_parallel_size == sp
        plan = plan_curriculum(cfg.curriculum.stages, cfg.batch, world // sp, sp)
        assert {s.tokens_per_step for s in plan.stages} == {cfg.batch.tokens_per_step}


def test_tiny_experiment_is_the_default():
    assert load_config(_compose()) == load_config(_compose("+experiment=tiny"))


@pytest.mark.parametrize("group", ["model", "pattern", "curriculum", "data", "deepspeed", "optim", "logger"])
def test_every_group_option_composes_and_validates(group):
    for option in _options(group):
        cfg = load_config(_compose(f"{group}={option}"))
        assert isinstance(cfg, TrainConfig)


def test_hybrid_patterns_keep_two_of_seven_layers_full():
    cfg = load_config(_compose("pattern=power_hybrid"))
    assert cfg.pattern["name"] == "power" and cfg.pattern["schedule"] == "hybrid:2/7"


def test_cfg_job_prints_the_composed_experiment():
    proc = subprocess.run([sys.executable, "train.py", "+experiment=llama_128k", "--cfg", "job"],
                          cwd=CONFIGS.parent, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "sequence_parallel_size: 8" in proc.stdout and "seq_len: 131072" in proc.stdout


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"),
    ("precision=bf32", "precision"),
    ("batch.tokens_per_step=abc", "batch.tokens_per_step"),
    ("parallel.sequence_parallel_size=3", "curriculum.stages[0].seq_len"),  # 512 tokens do not split in 3
    ("pattern.window=0", "pattern"),
    ("pattern.name=powre", "pattern"),
    ("+pattern.windw=3", "pattern"),
    ("+deepspeed.train_batch_size=64", "deepspeed.train_batch_size"),
    ("deepspeed.zero_optimization.stage=4", "deepspeed.zero_optimization.stage"),
    ("model.arch.num_key_value_heads=4", "model.arch"),
    ("+model.arch.hiden_size=64", "model.arch"),
    ("optim.schedule=cosin", "optim.schedule"),
    ("checkpoint.save_dtype=int8", "checkpoint.save_dtype"),
    ("data.seq_len=333", "data.seq_len"),
    ("+curriculum.stages.0.tokens=100", "curriculum.stages[0]"),
    ("logger.mode=sometimes", "logger.mode"),
    ("data.synthetic.tasks=[passkey,recal]", "data.synthetic.tasks"),
    ("data.synthetic.tasks=[]", "data.synthetic.tasks"),
    ("model.fused_ops=ligre", "model.fused_ops"),
    ("model.attention_backend=sdpa", "model.attention_backend"),  # the default pattern is sparse
])
def test_bad_values_fail_fast_naming_the_key(override, key):
    composed = _compose(override)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(composed)
    assert time.perf_counter() - start < 1.0
    assert key in str(err.value)


def test_unknown_keys_are_named_with_a_suggestion():
    raw = {"curriculum": {"stages": [{"seq_len": 128, "steps": 1}, {"seq_lenn": 256, "steps": 1}]}}
    with pytest.raises(ConfigError, match=r"curriculum\.stages\[1\]\.seq_lenn.*did you mean 'seq_len'"):
        load_config(raw)
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'"):
        load_config({"optim": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"data\.synthetic\.num_doc"):
        load_config({"data": {"synthetic": {"num_doc": 3}}})


def test_hydra_rejects_an_unknown_override_before_train_runs():
    with pytest.raises(Exception, match="lrr"):
        _compose("optim.lrr=1")


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "lrr"),                                    # a mistyped key (Hydra)
    ("optim.lr=-1", "optim.lr: must be > 0"),                  # a bad value (validate)
    ("pattern.window=0", "window must be >= 1"),               # a bad pattern parameter
    ("model.attention_backend=cuda", "model.attention_backend"),
    ("checkpoint.max_shard_size=5XB", "checkpoint.max_shard_size"),
])
def test_cli_rejects_bad_config_before_importing_torch(override, message):
    # What makes `python train.py optim.lrr=1` fail in well under a second: nothing heavy loads first.
    proc = subprocess.run([sys.executable, "-X", "importtime", "train.py", override],
                          cwd=CONFIGS.parent, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "hydra" in imported and not imported & {"torch", "deepspeed", "datasets"}


@pytest.mark.parametrize("override, message", [
    ("batch_size=0", "batch_size must be >= 1"), ("backend=cuda", "unknown backend 'cuda'"),
    ("dtype=fp8", "unknown dtype 'fp8'"), ("+task.bogus=1", "no parameter(s) ['bogus']"),
])
def test_eval_cli_rejects_bad_config_before_importing_torch(tmp_path, override, message):
    (tmp_path / "config.json").write_text("{}")  # passes the folder check; the weights are never read
    proc = subprocess.run([sys.executable, "-X", "importtime", "eval.py", f"checkpoint={tmp_path}", override],
                          cwd=CONFIGS.parent, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "hydra" in imported and "torch" not in imported


def test_config_modules_import_without_torch():
    # Config checks are importable without torch, sentencepiece or datasets: the package __init__s load lazily.
    code = ("import sys, powerattn.data.config, powerattn.data.synthetic, powerattn.training.config, "
            "powerattn.evaluation.config, powerattn.model.config, powerattn.patterns, powerattn.choices\n"
            "print(sorted({'torch', 'sentencepiece', 'datasets', 'deepspeed'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=CONFIGS.parent, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr



def test_a_model_folder_brings_its_own_tokenizer(tmp_path, monkeypatch):
    """Continuing a model with the default data keeps the model's tokenizer: the synthetic one has the same
    size, so no vocabulary check could catch the swap."""
    from powerattn.training.run import preflight

    assert load_config(_compose()).data.tokenizer is None
    assert load_config(_compose(f"model.path={tmp_path}")).data.tokenizer == str(tmp_path)
    assert load_config(_compose(f"model.path={tmp_path}", "data.tokenizer=/t/tok.model")).data.tokenizer \
        == "/t/tok.model"
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="^data.tokenizer: "):  # a folder with weights but no tokenizer
        preflight(_compose(f"model.path={tmp_path}", f"output_dir={tmp_path / 'run'}"))
