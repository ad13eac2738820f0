"""train.py and the launchers end to end on CPU (DS_ACCELERATOR=cpu, gloo): the default run, a two-node
SLURM job simulated on this machine (ZeRO-3, preempted by SIGUSR1, requeued, resumed), Ulysses SP=2,
kill -9 + resume=auto, SIGUSR1 to a plain run, and a fast failure on a bad config.

Runs share one reference: a single-process run of a very small model for 16 steps (2 stages). One
OpenMP thread per process makes CPU results bitwise reproducible, so a resumed run must match exactly;
other process layouts reduce in another order and match to float32 rounding.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import ENV, ROOT, SMALL, assert_same_curve, latest, metrics, reference_run, run, wait_for_steps

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    return metrics(reference_run(tmp_path_factory))


def test_default_run_writes_a_checkpoint_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "default"
    proc = run([sys.executable, "train.py", "logger=none", f"output_dir={out}", "curriculum.stages.0.steps=3",
                "curriculum.stages.1.steps=2", "final_eval.samples=1"])
    model_dir = out / "checkpoints" / "step_000005" / "model"
    assert f"model: {model_dir}" in proc.stdout
    assert "passkey accuracy:" in proc.stdout
    assert latest(out) == "step_000005"
    records = metrics(out)
    assert [r["seq_len"] for r in records] == [512] * 3 + [1024] * 2
    assert all(r["tokens_per_s"] > 0 for r in records) and records[-1]["tokens"] == 5 * 4096
    assert (out / "config.yaml").is_file() and (model_dir / "tokenizer.model").is_file()

    from powerattn.model import from_pretrained

    ours = from_pretrained(model_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.randint(3, ours.config.vocab_size, (1, 200))  # within the pattern's window: dense == sparse
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


FAKE_SRUN = r"""#!/usr/bin/env bash
# srun stand-in: run the command once per node of $SLURM_NNODES on this machine (SLURM_NODEID set).
out=""
while [[ "$1" == -* ]]; do
    case "$1" in --output) out="$2"; shift 2 ;; *) shift ;; esac
done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do
    SLURM_NODEID=$n "$@" > "${out//%n/$n}" 2>&1 &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
# scontrol stand-in: every node is this machine; requeue requests are recorded.
if [ "$1 $2" = "show hostnames" ]; then echo localhost; else echo "$*" >> "$FAKE_SLURM_LOG"; fi
"""


def test_slurm_two_nodes_zero3_preempted_requeued_and_resumed(tmp_path, reference):
    out, logs, bin_dir = tmp_path / "slurm", tmp_path / "logs", tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "powerattn", "SLURM_SUBMIT_DIR": str(ROOT), "GPUS_PER_NODE": "1",
           "PORT": str(_free_port()), "LOG_DIR": str(logs), "FAKE_SLURM_LOG": str(tmp_path / "scontrol.log")}
    cmd = ["bash", "launch/slurm.sbatch", *SMALL, "deepspeed=zero3", f"output_dir={out}"]
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(out, job, 3)
    job.send_signal(signal.SIGUSR1)  # SLURM's warning before the time limit (--signal=B:USR1@300)
    log = job.communicate(timeout=240)[0]
    assert job.returncode == 0, log[-2000:] + (logs / "node0.log").read_text()[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    stopped = metrics(out)[-1]["step"]
    assert 3 <= stopped < 16 and latest(out) == f"step_{stopped:06d}"
    assert (logs / "node0.log").is_file() and (logs / "node1.log").is_file()

    run(["bash", "launch/slurm.sbatch", *SMALL, "deepspeed=zero3", f"output_dir={out}"], env=env)  # the requeued job
    assert_same_curve(metrics(out), reference)
    assert latest(out) == "step_000016"
    assert len(list((out / "checkpoints" / "step_000016" / "engine").glob("*optim_states.pt"))) == 2


def test_ulysses_sp2_matches_single_process(tmp_path, reference):
    out = tmp_path / "sp2"
    # Each GPU holds half of every row, so the step splits into other micro-batches: the loss is the same.
    run(["launch/torchrun.sh", *SMALL, "parallel.sequence_parallel_size=2", f"output_dir={out}"],
        env={**ENV, "NPROC": "2"})
    assert_same_curve(metrics(out), reference)


def test_kill9_then_resume_auto_reproduces_the_loss_curve(tmp_path, reference):
    out = tmp_path / "killed"
    cmd = [sys.executable, "train.py", *SMALL, f"output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_steps(out, proc, 5)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    logged = len(metrics(out))
    step = int(latest(out).removeprefix("step_"))  # whichever checkpoint was complete when the process died
    assert step % 3 == 0 and 3 <= step <= logged < 16
    assert (out / "checkpoints" / latest(out) / "trainer_state.json").is_file()
    run(cmd)  # resume=auto is the default
    assert_same_curve(metrics(out), reference, exact=True)
    assert latest(out) == "step_000016"
    assert not list((out / "checkpoints").glob(".*partial"))


def test_sigusr1_checkpoints_and_exits_zero(tmp_path):
    out = tmp_path / "preempted"
    cmd = [sys.executable, "train.py", *SMALL, "curriculum.stages.1.steps=1000", "checkpoint.every=0",
           f"output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(out, proc, 2)
    proc.send_signal(signal.SIGUSR1)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "stopped by SIGUSR1" in log
    step = metrics(out)[-1]["step"]
    assert latest(out) == f"step_{step:06d}" and step < 1004


def test_bad_config_fails_fast_naming_the_key(tmp_path):
    start = time.time()
    proc = subprocess.run([sys.executable, "train.py", "optim.lr=-1", f"output_dir={tmp_path / 'x'}"], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "optim.lr" in proc.stderr
    assert time.time() - start < 15  # no data, model or DeepSpeed work (the bulk is importing torch)
    assert not (tmp_path / "x").exists()  # the run folder is created only once every check has passed


def test_hf_tokenizer_json_trains_and_ships_with_the_checkpoint(tmp_path):
    # A Llama-3-style tokenizer.json model folder: the data pipeline, the final passkey check and the
    # checkpoint's tokenizer files, which transformers loads as the same tokenizer.
    transformers = pytest.importorskip("transformers")
    from test_data_tokenizer import LLAMA3, hf_folder

    from powerattn.data.tokenizer import Tokenizer

    folder = hf_folder(tmp_path / "tok", LLAMA3)
    out = tmp_path / "run"
    proc = run([sys.executable, "train.py", "logger=none", f"output_dir={out}", f"data.tokenizer={folder}",
                "curriculum.stages.0.steps=2", "curriculum.stages.1.steps=1", "final_eval.samples=1"])
    assert "passkey accuracy:" in proc.stdout
    model_dir = out / "checkpoints" / "step_000003" / "model"
    assert (model_dir / "tokenizer.json").is_file() and (model_dir / "tokenizer_config.json").is_file()
    ours = Tokenizer.from_pretrained(model_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = "The pass key is 90210. Remember it."
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text, bos=False)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id)
