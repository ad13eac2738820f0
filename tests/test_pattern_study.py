"""bench/pattern_study.py end to end at its --smoke sizes: every pattern trained through train.py and
evaluated through eval.py, the prediction beside each measurement, and the merge of partial runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = ["power", "sliding_window", "stride_slash", "dilated", "longnet", "full"]


def _study(out: Path, *args: str) -> dict:
    subprocess.run([sys.executable, "bench/pattern_study.py", "--out", str(out), *args], cwd=ROOT, check=True,
                   capture_output=True, timeout=900)
    assert (out / "study.png").stat().st_size > 0
    return json.loads((out / "study.json").read_text())


@pytest.mark.slow
def test_smoke_study_runs_every_pattern(tmp_path):
    study = _study(tmp_path / "s", "--smoke", "--jobs", "2")
    assert study["smoke"] and sorted(study["patterns"]) == sorted(PATTERNS)
    lengths, depths = study["eval"]["lengths"], study["depths"]
    assert len(depths) >= 10
    for name, e in study["patterns"].items():
        assert "error" not in e, e.get("error")
        assert e["pattern"]["name"] == name and e["pattern"]["block_size"] == study["model"]["block_size"]
        assert len(e["accuracy"]) == len(lengths) and all(len(row) == len(depths) for row in e["accuracy"])
        assert all(0.0 <= a <= 1.0 for row in e["accuracy"] for a in row)
        reach = e["prediction"]["reachable"]
        assert len(reach) == len(lengths) and all(len(row) == len(depths) for row in reach)
        assert set(e["density"]) == {str(n) for n in lengths}
        assert e["loss"]["steps"] == 6 and e["loss"]["first"] > e["loss"]["min"]
        # Each pattern continues the base: it starts below the base's randomly initialised loss.
        assert e["loss"]["first"] < study["base"]["loss"]["first"]
        assert e["train_seconds"] > 0 and e["eval_seconds"] > 0
        assert not (tmp_path / "s" / "runs" / name / "checkpoints").exists()  # only JSON, PNG and logs kept
    base = study["base"]
    assert base["pattern"]["name"] == "full" and base["loss"]["steps"] == 4
    assert len(base["accuracy"]) == 1 and base["eval"]["lengths"] == [256]  # its own length only
    assert (tmp_path / "s" / "runs" / "base" / "model" / "config.json").is_file()  # kept for --base
    assert study["patterns"]["full"]["density"][str(lengths[-1])] == 1.0
    assert all(v == 1.0 for row in study["patterns"]["full"]["prediction"]["reachable"] for v in row)
    # stride_slash cannot reach the needle right after the header within 2 layers at 512 tokens.
    assert study["patterns"]["stride_slash"]["prediction"]["reachable"][-1][0] == 0.0

    part = tmp_path / "part.json"
    part.write_text(json.dumps({**study, "patterns": {"power": study["patterns"]["power"]}}))
    merged = _study(tmp_path / "m", "--merge", str(part), str(tmp_path / "s" / "study.json"))
    assert sorted(merged["patterns"]) == sorted(PATTERNS)
    assert merged["environment"] == study["environment"]  # the runs' device, not the merging machine's
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**study, "eval": {**study["eval"], "samples": 2}}))
    done = subprocess.run([sys.executable, "bench/pattern_study.py", "--out", str(tmp_path / "x"), "--merge",
                           str(part), str(other)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "another recipe or eval grid" in done.stderr
    assert study["recipe"]["optim"]["lr"] > 0 and study["recipe"]["data"]["synthetic"]["tasks"]
    other.write_text(json.dumps({**study, "recipe": {**study["recipe"], "optim": {"lr": 1.0}}}))
    done = subprocess.run([sys.executable, "bench/pattern_study.py", "--out", str(tmp_path / "y"), "--merge",
                           str(part), str(other)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "another recipe or eval grid" in done.stderr
    other.write_text(json.dumps({**study, "base": {**study["base"], "overrides": ["+experiment=other"]}}))
    done = subprocess.run([sys.executable, "bench/pattern_study.py", "--out", str(tmp_path / "z"), "--merge",
                           str(part), str(other)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "another recipe or eval grid" in done.stderr

    # A second study continues the first one's base instead of training its own.
    base_dir = tmp_path / "s" / "runs" / "base" / "model"
    again = _study(tmp_path / "b", "--smoke", "--patterns", "full", "--base", str(base_dir))
    assert again["base"]["model"] == str(base_dir.resolve()) and "loss" not in again["base"]
    assert not (tmp_path / "b" / "runs" / "base").exists()
    assert again["patterns"]["full"]["loss"]["first"] < study["base"]["loss"]["first"]


def test_predict_needs_no_training(tmp_path):
    """The receptive-field prediction alone: sliding window misses the middle of an 8K context in
    6 layers, power and full reach every depth."""
    small = ["data.synthetic.num_docs=200", "data.synthetic.max_sentences=60"]
    study = _study(tmp_path / "p", "--predict", "--patterns", "power,sliding_window,full", *small,
                   *(f"--base-override={o}" for o in small))
    reach = {n: e["prediction"]["reachable"][-1] for n, e in study["patterns"].items()}
    assert all(v == 1.0 for v in reach["power"]) and all(v == 1.0 for v in reach["full"])
    assert reach["sliding_window"][0] == 1.0 and reach["sliding_window"][-1] == 1.0  # sink block, window
    assert min(reach["sliding_window"]) == 0.0
    one_hop = {n: e["prediction"]["reachable_one_hop"][-1] for n, e in study["patterns"].items()}
    assert all(v == 1.0 for v in one_hop["full"])
    assert all(o <= r for n in one_hop for o, r in zip(one_hop[n], reach[n]))
    assert sum(one_hop["power"]) < sum(reach["power"])  # power needs relays for most depths
    assert "accuracy" not in study["patterns"]["power"]


def test_bad_override_fails_before_training(tmp_path):
    done = subprocess.run([sys.executable, "bench/pattern_study.py", "--out", str(tmp_path), "pattern=full"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "may not set pattern" in done.stderr
    done = subprocess.run([sys.executable, "bench/pattern_study.py", "--out", str(tmp_path), "--base",
                           str(tmp_path / "none")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is not a model folder" in done.stderr


def test_prediction_counts_from_the_block_that_predicts_the_answer():
    """An n-token prompt's key digits are predicted from position n on: one block past the prompt's
    last block. A needle at the left edge of the prompt's last window is out of the answer's window."""
    import importlib.util

    from powerattn.patterns import make_pattern

    spec = importlib.util.spec_from_file_location("pattern_study", ROOT / "bench" / "pattern_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    pattern, n = make_pattern("sliding_window", block_size=64, window=4, sink=1), 64 * 16
    last = n // 64 - 1

    def reach(block: int) -> float:
        spans = {(n, 0.5, 0): (64 * block + 8, 64 * block + 40)}
        return study.prediction(pattern, 1, spans, [n], [0.5], 1)["reachable"][0][0]

    assert reach(last - 3) == 0.0  # in the prompt's last block's window, not in the answer block's
    assert reach(last - 2) == 1.0 and reach(0) == 1.0  # the answer block's window; the sink
