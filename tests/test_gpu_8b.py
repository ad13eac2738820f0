"""The 8B benchmark's CPU parts: `+experiment=llama3_8b_128k` takes its Ulysses size from the launcher, the
summary reads train.py's files, and bench/gpu_8b.sh rehearsed on CPU with a tiny random folder: random HF
folder -> train.py with the experiment (ZeRO-3, Ulysses SP=2 over 2 processes, two curriculum lengths) ->
summary, table and tarball."""

import importlib.util
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from powerattn.training.config import load_config
from powerattn.training.curriculum import plan_curriculum

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("summarize_runs", ROOT / "bench" / "summarize_runs.py")
summarize_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize_runs)


def _experiment(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return load_config(compose("train", overrides=["+experiment=llama3_8b_128k", *overrides]))


@pytest.mark.parametrize("env, sp", [({}, 8), ({"LOCAL_WORLD_SIZE": "2"}, 2), ({"LOCAL_SIZE": "4"}, 4)])
def test_experiment_runs_ulysses_over_the_nodes_gpus(monkeypatch, env, sp):
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = _experiment()
    assert cfg.parallel.sequence_parallel_size == sp
    plan = plan_curriculum(cfg.curriculum.stages, cfg.batch, 1, sp)  # one node: data-parallel size 1
    assert [s.seq_len for s in plan.stages] == [32768, 65536, 131072]
    assert {s.micro_batch_size * s.seq_len // sp for s in plan.stages} == {65536}  # tokens per GPU per micro


def test_experiment_rope_is_llama31s():
    make_random_hf = importlib.util.spec_from_file_location("m", ROOT / "bench" / "make_random_hf.py")
    module = importlib.util.module_from_spec(make_random_hf)
    make_random_hf.loader.exec_module(module)
    cfg = _experiment()
    assert cfg.model.rope_scaling == module.ROPE["llama3.1"]["rope_scaling"]
    assert cfg.model.max_position_embeddings == 131072


def _stamped(lines: list[tuple[float, str]]) -> str:
    return "".join(f"[{t:7.1f}s] {text}\n" for t, text in lines)


def test_summary_rows_per_length_speedups_phases_and_errors(tmp_path):
    work = tmp_path
    for name, pattern, recs in [
        ("a_power", "power", [(1024, 100.0), (1024, 200.0), (1024, 220.0), (2048, 50.0), (2048, 180.0)]),
        ("a_full", "full", [(1024, 90.0), (1024, 100.0)]),
    ]:
        run = work / "runs" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"model: {{path: /m}}\npattern: {{name: {pattern}}}\n"
                                         "parallel: {sequence_parallel_size: 2}\n"
                                         "deepspeed: {zero_optimization: {stage: 3}}\n")
        (run / "metrics.jsonl").write_text("".join(json.dumps(
            {"seq_len": s, "tokens_per_s": t, "mfu": 0.3, "step_time_s": s / t, "peak_mem_gb": s / 100,
             "loss": 11.0}) + "\n" for s, t in recs))
        (work / f"{name}.log").write_text(_stamped([
            (20.0, "data source 'synthetic': 6 docs, 100 tokens -> x"), (50.5, "run folder /x; 2 process(es)"),
            (60.0, "step 1: loss=11")]))
        (work / f"{name}.smi.csv").write_text("0, 1024\n1, 2048\n0, 4096\n")
    (work / "b.log").write_text(_stamped([(3.0, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
                                                "2.00 GiB")]))
    (work / "status.txt").write_text("a_power rc=0 70s\na_full rc=0 40s\nb rc=1 5s\nc skipped (budget: 3s left)\n")
    out = summarize_runs.summarize(work, ["a_power", "a_full", "b", "c"], compare=[("a_power@1K", "a_full")])
    p1, p2, full = out["a_power@1K"], out["a_power@2K"], out["a_full"]
    assert (p1["steps"], p1["tokens_per_s"], p2["tokens_per_s"]) == (3, 210.0, 180.0)  # first step left out
    assert p1["speedup_vs_full"] == pytest.approx(2.1) and "speedup_vs_full" not in p2
    assert p1["load_s"] == 30.5 and p1["startup_s"] == 50.5 and p1["gpu_mem_used_gib"] == {"0": 4.0, "1": 2.0}
    assert (full["sp"], full["zero"], full["rc"]) == (2, 3, 0)
    assert "out of memory" in out["b"]["oom"] and out["c"]["skipped"].startswith("budget")
    assert out["a_power@1K_vs_a_full_max_abs_loss_diff"] == 0.0
    text = summarize_runs.table(out)
    assert "a_power@2K" in text and "skipped" in text and "b: torch.OutOfMemoryError" in text


@pytest.mark.slow
def test_gpu_8b_script_rehearsed_on_cpu(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "SHAPE": "tiny", "SHORT": "256",
           "LONG": "512", "STEPS": "2", "ONLY_8B": "1", "MODEL_DIR": str(tmp_path / "model"),
           "WORK": str(tmp_path / "work"), "EXTRA": "model.arch=null pattern.block_size=64 precision=fp32"}
    proc = subprocess.run(["bash", "bench/gpu_8b.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary_8b.json").read_text())
    assert summary["make_hf"]["rc"] == 0 and summary["make_hf"]["report"]["shape"] == "tiny"
    for name, pattern in [("8b_power@256", "power"), ("8b_power@512", "power"), ("8b_full", "full")]:
        row = summary[name]
        assert (row["rc"], row["steps"], row["pattern"], row["sp"], row["zero"]) == (0, 2, pattern, 2, 3), name
        assert row["tokens_per_s"] > 0 and row["load_s"] >= 0 and row["losses"][0] > 5
    assert summary["8b_full"]["speedup_vs_full"] == 1.0 and summary["8b_power@256"]["speedup_vs_full"] > 0
    assert "8b_power@512" in proc.stdout  # the table is printed
    assert sorted(p.name for p in out.iterdir()) == ["env_8b.json", "logs_8b.tar.gz", "status_8b.txt",
                                                    "summary_8b.json", "table_8b.txt"]
    with tarfile.open(out / "logs_8b.tar.gz") as tar:
        names = tar.getnames()
    assert "./runs/8b_power/metrics.jsonl" in names and "./8b_power.log" in names
    assert not any(n.endswith(".safetensors") for n in names)


@pytest.mark.slow
def test_gpu_frontier_script_rehearsed_on_cpu(tmp_path):
    tiny = ("model.arch.hidden_size=64 model.arch.intermediate_size=128 model.arch.num_hidden_layers=2 "
            "model.arch.num_attention_heads=2 model.arch.num_key_value_heads=2 model.arch.vocab_size=4096 "
            "pattern.block_size=64 precision=fp32")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "LENGTHS": "1024 2048", "SHORT": "1024",
           "STEPS": "2", "WORK": str(tmp_path / "work"), "EXTRA": tiny}
    proc = subprocess.run(["bash", "bench/gpu_frontier.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary_frontier.json").read_text())
    assert sorted(k for k in summary if isinstance(summary[k], dict)) == [
        "8b_full_1k", "8b_offload_1k", "8b_switched@1K", "8b_switched@2K", "8b_tiled_1k"]
    for name, row in summary.items():
        assert (row["rc"], row["steps"], row["sp"], row["zero"]) == (0, 2, 2, 3), name
    switched = summarize_runs._yaml(tmp_path / "work" / "runs" / "8b_switched" / "config.yaml")["model"]
    assert (switched["offload_activations"], switched["tiled_mlp"], switched["path"]) == (True, 8192, None)
    plan = (out / "plan_frontier.txt").read_text()  # the planner's prediction of every run, one block each
    assert [line for line in plan.splitlines() if line.startswith("== ")] == [
        "== 8b_switched", "== 8b_offload_1k", "== 8b_tiled_1k", "== 8b_neither_1k"]
    assert plan.count("inputs offloaded, MLP tiles of 8192 tokens") == 1 and "stage 1      2048" in plan
