"""`python -m powerattn.lm_eval` end to end on CPU: two local tasks (a task YAML over a local jsonl) on a tiny
checkpoint; lm-eval's own scores equal our model's (the pattern ran, not dense attention)."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install -e '.[eval]'")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate: pip install 'lm-eval[hf]'")
transformers = pytest.importorskip("transformers")

from powerattn.data.filler import Filler  # noqa: E402
from powerattn.data.tokenizer import Tokenizer  # noqa: E402
from powerattn.model import from_pretrained  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = """task: {name}
output_type: {kind}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
"""
GENERATE = "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"


def _samples(out: Path, task: str) -> list[dict]:
    (file,) = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
    return [json.loads(line) for line in Path(file).read_text().splitlines()]


def test_lm_eval_cli_runs_the_pattern(tmp_path):
    from test_data_tokenizer import LLAMA3, hf_folder
    from test_hf import load, tiny_checkpoint

    tok_dir = hf_folder(tmp_path / "tok", LLAMA3)
    ckpt = tiny_checkpoint(tmp_path / "ckpt", vocab_size=Tokenizer.from_pretrained(tok_dir).vocab_size,
                           tokenizer_dir=str(tok_dir))
    docs = [{"context": Filler(i).text(4 + i), "target": Filler(100 + i).text(1)} for i in range(4)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "docs.jsonl"
    (tasks / "ll.yaml").write_text(TASK.format(name="tiny_ll", kind="loglikelihood", data=data)
                                   + "metric_list:\n  - metric: perplexity\n")
    (tasks / "gen.yaml").write_text(TASK.format(name="tiny_gen", kind="generate_until", data=data) + GENERATE
                                    + "metric_list:\n  - metric: exact_match\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "powerattn.lm_eval", "--model", "hf",
         "--model_args", f"pretrained={ckpt},attn_implementation=powerattn,dtype=float32",
         "--tasks", "tiny_ll,tiny_gen", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2",
         "--output_path", str(out), "--log_samples"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "tiny_ll" in proc.stdout and "attn_implementation': 'powerattn'" in proc.stdout

    ours, dense, tokenizer = from_pretrained(ckpt), load(ckpt, "sdpa"), transformers.AutoTokenizer.from_pretrained(ckpt)

    def loglikelihood(model_logits, context: str, continuation: str) -> float:
        whole = tokenizer.encode(context + continuation)  # lm-eval's split: encode the whole, cut at the context
        start = len(tokenizer.encode(context))
        with torch.no_grad():
            logp = torch.log_softmax(model_logits(torch.tensor([whole])).float()[0], -1)
        return float(logp[torch.arange(start - 1, len(whole) - 1), torch.tensor(whole[start:])].sum())

    gaps = []
    for s in _samples(out, "tiny_ll"):
        args = s["arguments"]["gen_args_0"]
        got = float(s["resps"][0][0][0])
        assert got == pytest.approx(loglikelihood(ours, args["arg_0"], args["arg_1"]), abs=1e-3)
        gaps.append(abs(got - loglikelihood(lambda x: dense(x).logits, args["arg_0"], args["arg_1"])))
    assert max(gaps) > 0.05  # sdpa (dense) would have scored otherwise

    # Generation: batches of prompts of different lengths (left padding), transformers' cache, our decode.
    for s in _samples(out, "tiny_gen"):
        ids = tokenizer.encode(s["arguments"]["gen_args_0"]["arg_0"])
        new = ours.generate(torch.tensor([ids]), max_new_tokens=6)[0, len(ids):].tolist()
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id)]
        assert s["resps"][0][0] == tokenizer.decode(new, skip_special_tokens=True).split(".")[0]
