"""The pattern study: does retrieval follow the receptive field? (docs/study.md)

The paper's setting in miniature: one small LLaMA is pretrained once with full attention on short
documents at 1K tokens (`train.py +experiment=pattern_study_base`), where retrieval is learned; each
pattern then continues that base on the same long-document mixture at 4K -> 8K tokens (`train.py
+experiment=pattern_study pattern=NAME model.path=BASE`), and `eval.py task=passkey` runs on its final
checkpoint (lengths x depths x samples); the base is evaluated too, at its own length. Beside each
measurement sits the receptive-field prediction for the same prompts: a needle is reachable when one
of its blocks is within the model's layer count of hops from the last block (`powerattn.receptive_field`).

    python bench/pattern_study.py --out DIR                 # all six patterns, one GPU (or CPU)
    python bench/pattern_study.py --out DIR --jobs 2 --gpus 0,1   # one training per GPU side by side
    python bench/pattern_study.py --out DIR --patterns power,full
    python bench/pattern_study.py --out DIR --base OLD/runs/base/model   # reuse a trained base
    python bench/pattern_study.py --out DIR --merge A/study.json B/study.json   # join partial runs
    python bench/pattern_study.py --out DIR --predict       # the theory table only, nothing trained
    python bench/pattern_study.py --out DIR --smoke         # tiny sizes, CPU, minutes (CI)

Writes DIR/study.json (per pattern: density, prediction, accuracy by length x depth, loss summary,
seconds; the base's loss and passkey), DIR/study.png and DIR/logs/NAME.{train,eval}.log per training.
Checkpoints live under DIR/runs/; the patterns' are deleted after evaluation unless --keep-checkpoints,
the base's model folder is kept (DIR/runs/base/model) for --base.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from powerattn.atomic import atomic_write, save_figure  # noqa: E402  (runs from a plain checkout)

SCHEMA = "powerattn.pattern_study/1"
PATTERNS = ("power", "sliding_window", "stride_slash", "dilated", "longnet", "full")
EXPERIMENT = "pattern_study"
BASE_EXPERIMENT = "pattern_study_base"
EVAL = {"lengths": [2048, 4096, 8192], "depths": 11, "samples": 10, "batch_size": 16}
# A few minutes on a 2-core CPU for all six patterns: the pipeline end to end, not a result.
SMOKE_OVERRIDES = [
    "model.arch.hidden_size=64", "model.arch.intermediate_size=128", "model.arch.num_hidden_layers=2",
    "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=1",
    "model.arch.max_position_embeddings=512", "pattern.block_size=32",
    "curriculum.stages=[{seq_len:256,steps:3},{seq_len:512,steps:3}]",
    "batch.tokens_per_step=1024", "batch.micro_batch_tokens=512", "optim.warmup_steps=1",
    "data.synthetic.num_docs=120", "data.synthetic.min_sentences=10", "data.synthetic.max_sentences=60",
    "data.synthetic.vocab_size=512",
]
SMOKE_BASE = ["curriculum.stages=[{seq_len:256,steps:4}]", "data.synthetic.min_sentences=4",
              "data.synthetic.max_sentences=20"]
SMOKE_EVAL = {"lengths": [256, 512], "depths": 10, "samples": 1, "batch_size": 10}


def compose(overrides: list[str]):
    """The training config train.py would run with these overrides (Hydra's own composition)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def prepare_data(cfg) -> None:
    """Build the corpus, tokenizer and token cache once, before trainings start side by side."""
    from omegaconf import OmegaConf

    from powerattn.data import build_loader

    build_loader(OmegaConf.to_container(cfg.data, resolve=True))


def _run(cmd: list[str], log: Path, env: dict) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{cmd[1]} failed (exit {done.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - start


def latest_model(run_dir: Path) -> Path:
    """The model folder of the checkpoint `checkpoints/latest` names (the run folder contract)."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        raise RuntimeError(f"{run_dir}: training wrote no checkpoint (no checkpoints/latest)")
    return run_dir / "checkpoints" / pointer.read_text().strip() / "model"


def loss_summary(metrics: Path) -> dict:
    """First/last/min loss, the mean of the last tenth, the last loss of each stage, tokens/s."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if r["loss"] is not None and math.isfinite(r["loss"])]
    tail = losses[-max(1, len(losses) // 10):]
    stages: dict[int, dict] = {}
    for r in rows:
        stages[r["stage"]] = {"seq_len": r["seq_len"], "last_step": r["step"], "loss": r["loss"]}
    return {
        "steps": len(rows), "tokens": rows[-1]["tokens"] if rows else 0,
        "first": losses[0] if losses else None, "last": losses[-1] if losses else None,
        "min": min(losses) if losses else None, "final_mean": sum(tail) / len(tail) if tail else None,
        "by_stage": [stages[k] for k in sorted(stages)],
        "tokens_per_s": _median([r["tokens_per_s"] for r in rows[len(rows) // 10:]]),
        "curve": [[r["step"], round(r["loss"], 4)] for r in rows[:: max(1, len(rows) // 100)]],
    }


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def needle_blocks(tokenizer, lengths, depths, samples: int, seed: int) -> dict:
    """Token span of the needle in every eval prompt, built exactly as eval.py's passkey grid builds it."""
    from powerattn.data.synthetic import passkey
    from powerattn.evaluation.passkey import cell_seed

    spans = {}
    for n in lengths:
        for d in depths:
            for s in range(samples):
                spec = passkey(cell_seed(seed, n, d, s), depth=d)
                start = spec.to_tokens(tokenizer, n).needle_positions[0]
                spans[(n, d, s)] = (start, start + len(tokenizer.encode_pieces(list(spec.needles))[0]))
    return spans


def prediction(pattern, layers: int, spans: dict, lengths, depths, samples: int) -> dict:
    """Receptive-field theory per (length, depth): share of prompts whose needle the answer's block reaches.

    A prompt of n tokens ends with "The pass key is"; the model writes the key's leading "▁" piece at
    position n and predicts every digit from positions n onwards, so the queries that must see the needle
    sit in the block holding position n: one past the prompt's last block when n is a multiple of the
    block size (every eval length). That block is the last one of an (n + 1)-token sequence.
    """
    from powerattn.receptive_field import receptive_field

    reach, hops_needed, coverage = [], [], {}
    for n in lengths:
        rf = receptive_field(pattern, n + 1, layers)
        coverage[str(n)] = rf.coverage
        row_reach, row_hops = [], []
        for d in depths:
            cells = []
            for s in range(samples):
                start, end = spans[(n, d, s)]
                blocks = rf.hops[start // pattern.block_size: (end - 1) // pattern.block_size + 1]
                reached = blocks[blocks >= 0]
                cells.append(int(reached.min()) if reached.numel() else -1)
            row_reach.append(sum(h >= 0 for h in cells) / len(cells))
            row_hops.append(min((h for h in cells if h >= 0), default=-1))
        reach.append(row_reach)
        hops_needed.append(row_hops)
    return {"layers": layers, "reachable": reach, "fewest_hops": hops_needed, "coverage_by_layer": coverage}


def pattern_of(cfg):
    from omegaconf import OmegaConf

    from powerattn.patterns import pattern_from_dict

    return pattern_from_dict(OmegaConf.to_container(cfg.pattern, resolve=True))


def _env(args, gpu: str | None) -> dict:
    env = dict(os.environ)
    # Side-by-side trainings each taking every core ran 30-100x slower than one alone (docs/study.md).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def train_and_eval(name: str, overrides: list[str], ev: dict, out: Path, env: dict) -> tuple[dict, Path]:
    """train.py with `overrides` into DIR/runs/NAME, eval.py's passkey grid on its last checkpoint."""
    run_dir, logs = out / "runs" / name, out / "logs"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*overrides, f"output_dir={run_dir}", f"run_name=study_{name}", "resume=none", "progress=false"]
    train_s = _run([sys.executable, "train.py", *overrides], logs / f"{name}.train.log", env)
    model = latest_model(run_dir)
    lengths = ",".join(map(str, ev["lengths"]))
    eval_s = _run([sys.executable, "eval.py", f"checkpoint={model}", "task=passkey", f"task.lengths=[{lengths}]",
                   f"task.depths={ev['depths']}", f"task.samples={ev['samples']}", f"batch_size={ev['batch_size']}",
                   f"output_dir={run_dir / 'eval'}", "progress=false"], logs / f"{name}.eval.log", env)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    res = results["results"]
    entry = {
        "pattern": results["attention"]["pattern"], "key": results["attention"]["key"],
        "accuracy": res["accuracy"], "accuracy_by_length": res["accuracy_by_length"],
        "accuracy_by_depth": res["accuracy_by_depth"], "mean_accuracy": res["mean_accuracy"],
        "loss": loss_summary(run_dir / "metrics.jsonl"),
        # What the model answered, a dozen prompts spread over the grid: tells "wrong key" from "no key".
        "examples": [{k: r[k] for k in ("length", "depth", "answer", "prediction")}
                     for r in res["records"][:: max(1, len(res["records"]) // 12)]],
        "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "device": results["environment"]["device"],
    }
    return entry, model


def train_base(args, overrides: list[str], ev: dict) -> tuple[dict, Path]:
    """The full-attention base every pattern continues; its model folder stays under DIR/runs/base/model."""
    entry, model = train_and_eval("base", overrides, ev, Path(args.out), _env(args, _gpus(args)[0]))
    kept = Path(args.out) / "runs" / "base" / "model"  # one stable place, whatever the step was called
    shutil.move(model, kept)
    shutil.rmtree(Path(args.out) / "runs" / "base" / "checkpoints", ignore_errors=True)
    return entry, kept


def study_pattern(name: str, args, overrides: list[str], ev: dict, gpu: str | None) -> dict:
    """Continue the base with one pattern and evaluate it; returns its study.json entry."""
    out = Path(args.out)
    entry, _ = train_and_eval(name, [*overrides, f"pattern={name}"], ev, out, _env(args, gpu))
    if not args.keep_checkpoints:
        shutil.rmtree(out / "runs" / name / "checkpoints", ignore_errors=True)
    return entry


def _recipe(base: dict) -> list:
    """What makes two bases the same recipe (not their measured results)."""
    return [base.get(k) for k in ("experiment", "overrides", "stages", "recipe")]


def _gpus(args) -> list[str | None]:
    return args.gpus.split(",") if args.gpus else [None]


def environment() -> dict:
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
           (platform.processor() or platform.machine() or "cpu"),
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def add_theory(study: dict, tokenizer) -> None:
    """Density and the receptive-field prediction for every pattern in the study (same prompts as eval)."""
    from powerattn.evaluation.passkey import resolve_depths
    from powerattn.patterns import pattern_from_dict

    ev = study["eval"]
    depths = resolve_depths(ev["depths"])
    spans = needle_blocks(tokenizer, ev["lengths"], depths, ev["samples"], seed=0)
    for entry in study["patterns"].values():
        pattern = pattern_from_dict(entry["pattern"])
        entry["density"] = {str(n): pattern.density(n) for n in ev["lengths"]}
        entry["prediction"] = prediction(pattern, study["model"]["layers"], spans, ev["lengths"], depths,
                                         ev["samples"])
        # What one attention hop reaches: the bound for a model that has not learned to relay (docs/study.md).
        entry["prediction"]["reachable_one_hop"] = prediction(pattern, 1, spans, ev["lengths"], depths,
                                                              ev["samples"])["reachable"]
    study["depths"] = depths


def plot(study: dict, path: Path) -> None:
    """Accuracy by depth at the longest length (measured solid, theory dashed), and a heatmap per pattern."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n in PATTERNS if n in study["patterns"] and "prediction" in study["patterns"][n]]
    depths, lengths = study["depths"], study["eval"]["lengths"]
    cols = 3
    rows = 1 + math.ceil(len(names) / cols)
    fig = plt.figure(figsize=(4.2 * cols, 3.4 * rows), dpi=130)
    grid = fig.add_gridspec(rows, cols)
    ax = fig.add_subplot(grid[0, :])
    x = [100 * d for d in depths]
    for i, name in enumerate(names):
        entry, color = study["patterns"][name], f"C{i}"
        if "accuracy" in entry:
            ax.plot(x, [100 * a for a in entry["accuracy"][-1]], "o-", color=color, label=name)
        ax.plot(x, [100 * a for a in entry["prediction"]["reachable"][-1]], "--", color=color, alpha=0.6,
                lw=2.5, label=None if "accuracy" in entry else name)
        if "reachable_one_hop" in entry["prediction"]:
            ax.plot(x, [100 * a for a in entry["prediction"]["reachable_one_hop"][-1]], ":", color=color,
                    alpha=0.8, lw=1.5)
    ax.set(xlabel="needle depth (% of the context before the needle)", ylabel="passkey accuracy (%)",
           ylim=(-3, 103), title=f"Passkey at {lengths[-1]} tokens: measured (solid); needle reachable from the last "
           f"block within {study['model']['layers']} layers (dashed), within one hop (dotted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    for i, name in enumerate(names):
        entry = study["patterns"][name]
        hx = fig.add_subplot(grid[1 + i // cols, i % cols])
        reach = np.array(entry["prediction"]["reachable"], dtype=float).T
        acc = np.array(entry["accuracy"], dtype=float).T if "accuracy" in entry else reach
        hx.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        for (r, c), v in np.ndenumerate(acc):
            hx.text(c, r, f"{100 * v:.0f}" + ("" if reach[r, c] > 0 else "*"), ha="center", va="center",
                    fontsize=6)
        hx.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        hx.set_yticks(range(len(depths)), [f"{100 * d:.0f}" for d in depths], fontsize=6)
        density = entry["density"][str(lengths[-1])]
        what = "passkey %" if "accuracy" in entry else "reachable %"
        hx.set_title(f"{name} ({what}): density {100 * density:.1f}% at {lengths[-1]}", fontsize=8)
        hx.set_xlabel("length", fontsize=7)
        hx.set_ylabel("depth (%)", fontsize=7)
    fig.text(0.01, 0.005, "* = needle not reachable from the last block within the model's layers", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, bbox_inches="tight")


def dumps(obj) -> str:
    """JSON with nested dicts indented and lists of numbers on one line each (a diffable file)."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s+([-+\d.,\seEnul]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def write(study: dict, out: Path) -> None:
    plot(study, out / "study.png")
    atomic_write(out / "study.json", dumps(study))


def table(study: dict) -> str:
    """Accuracy by depth at the longest length per pattern, theory in brackets."""
    n = study["eval"]["lengths"][-1]
    head = f"{'pattern':<15} {'density':>8} {'mean':>6} | passkey % by depth at {n} tokens (reachable %)"
    lines = [head, " " * 32 + "  ".join(f"{100 * d:>7.0f}" for d in study["depths"])]
    for name in PATTERNS:
        e = study["patterns"].get(name)
        if not e or "accuracy" not in e:
            continue
        cells = "  ".join(f"{100 * a:>3.0f}({100 * r:>3.0f})"
                          for a, r in zip(e["accuracy"][-1], e["prediction"]["reachable"][-1]))
        lines.append(f"{name:<15} {100 * e['density'][str(n)]:>7.1f}% {100 * e['mean_accuracy']:>5.0f}% | {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for study.json, study.png, logs/ and runs/")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated, e.g. power,full")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the pipeline in minutes on a CPU")
    p.add_argument("--jobs", type=int, default=1, help="trainings run side by side")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids handed out round-robin to the jobs")
    p.add_argument("--merge", nargs="+", metavar="STUDY_JSON", help="join the patterns of earlier runs")
    p.add_argument("--predict", action="store_true", help="write the receptive-field prediction only")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the patterns' checkpoints")
    p.add_argument("--base", metavar="MODEL_DIR", help="continue this base model instead of training one")
    p.add_argument("--base-override", action="append", default=[], metavar="KEY=VALUE",
                   help="train.py override for the base only (repeatable), e.g. optim.lr=2e-3")
    p.add_argument("overrides", nargs="*", help="train.py overrides for the patterns' training, e.g. optim.lr=2e-3")
    args = p.parse_args(argv)
    args.patterns = args.patterns.split(",")
    unknown = [n for n in args.patterns if n not in PATTERNS]
    if unknown:
        p.error(f"--patterns: unknown pattern(s) {unknown}; choose from {','.join(PATTERNS)}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    reserved = ("pattern", "output_dir", "model.path")
    bad = [o for o in [*args.overrides, *args.base_override]
           if "=" not in o or o.split("=")[0].lstrip("+~") in reserved]
    if bad:
        p.error(f"overrides must be key=value and may not set {', '.join(reserved)} (the study does): {bad}")
    if args.base and not (Path(args.base) / "config.json").is_file():
        p.error(f"--base: {args.base!r} is not a model folder (no config.json)")
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)

    from omegaconf import OmegaConf

    from powerattn.data import load_tokenizer
    from powerattn.data.config import as_data_config
    from powerattn.data.tokenizer import Tokenizer

    overrides = [f"+experiment={EXPERIMENT}", *(SMOKE_OVERRIDES if args.smoke else []), *args.overrides]
    base_overrides = [f"+experiment={BASE_EXPERIMENT}", *(SMOKE_OVERRIDES + SMOKE_BASE if args.smoke else []),
                      *args.base_override]
    cfg, base_cfg = compose(overrides), compose(base_overrides)  # a bad override fails here, before any training
    ev = dict(SMOKE_EVAL if args.smoke else EVAL)
    base_ev = {**ev, "lengths": [max(s.seq_len for s in base_cfg.curriculum.stages)]}
    study = {"schema": SCHEMA, "environment": environment(), "experiment": EXPERIMENT, "overrides": overrides,
             "base": {"experiment": BASE_EXPERIMENT, "overrides": base_overrides, "eval": base_ev,
                      "stages": [dict(s) for s in base_cfg.curriculum.stages],
                      "recipe": {k: OmegaConf.to_container(base_cfg[k], resolve=True) for k in ("data", "optim",
                                                                                                 "batch")},
                      **({"model": str(Path(args.base).resolve())} if args.base else {})},
             "smoke": args.smoke, "eval": ev, "patterns": {},
             "model": {"layers": cfg.model.arch.num_hidden_layers, "hidden_size": cfg.model.arch.hidden_size,
                       "block_size": cfg.pattern.block_size,
                       "stages": [dict(s) for s in cfg.curriculum.stages]},
             # The recipe as trained (the experiment file changes between runs; the JSON must not).
             "recipe": {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("data", "optim", "batch")}}

    if args.merge:
        for i, f in enumerate(args.merge):
            part = json.loads(Path(f).read_text())
            if i == 0:  # the recipe, eval grid and device of the runs, not of the merging machine
                study.update({k: part.get(k) for k in ("environment", "overrides", "eval", "model", "smoke",
                                                       "recipe", "base")})
            elif ([part.get(k) for k in ("overrides", "eval", "recipe")]
                  != [study[k] for k in ("overrides", "eval", "recipe")]
                  or _recipe(part.get("base", {})) != _recipe(study["base"])):
                p.error(f"--merge: {f} ran another recipe or eval grid than {args.merge[0]}")
            study["patterns"].update(part["patterns"])
    else:
        for name in args.patterns:  # the prediction exists before anything is trained
            pcfg = compose([*overrides, f"pattern={name}"])
            study["patterns"][name] = {"pattern": OmegaConf.to_container(pcfg.pattern, resolve=True)}
            study["patterns"][name]["pattern"].pop("schedule", None)
    # Eval prompts are built with the checkpoint's tokenizer, the base's: so are the predicted needle spans.
    if study["base"].get("model") and Path(study["base"]["model"]).is_dir():
        tokenizer = Tokenizer.from_pretrained(study["base"]["model"])
    else:
        tokenizer = load_tokenizer(as_data_config(OmegaConf.to_container(compose(study["base"]["overrides"]).data,
                                                                         resolve=True)))
    add_theory(study, tokenizer)
    if args.predict or args.merge:
        write(study, out)
        print(table(study) if args.merge else json.dumps(
            {n: e["prediction"]["reachable"][-1] for n, e in study["patterns"].items()}, indent=None))
        return

    started = time.perf_counter()
    if args.base:
        base_model = Path(study["base"]["model"])
    else:
        prepare_data(base_cfg)
        result, base_model = train_base(args, base_overrides, base_ev)
        study["base"].update(result)
        acc = 100 * result["mean_accuracy"]
        print(f"base (full, {base_ev['lengths'][0]} tokens): mean passkey {acc:.0f}% "
              f"({result['train_seconds']:.0f} s training)", flush=True)
    # The patterns' data use the base's tokenizer (data.tokenizer defaults to model.path).
    continued = [*overrides, f"model.path={base_model}"]
    prepare_data(compose(continued))
    gpus = _gpus(args)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {name: pool.submit(study_pattern, name, args, continued, ev, gpus[i % len(gpus)])
                   for i, name in enumerate(args.patterns)}
        failed = {}
        for name, fut in futures.items():
            try:
                study["patterns"][name].update(fut.result())
                print(f"{name}: mean passkey {100 * study['patterns'][name]['mean_accuracy']:.0f}% "
                      f"({study['patterns'][name]['train_seconds']:.0f} s training)", flush=True)
            except RuntimeError as e:
                failed[name] = str(e)
                study["patterns"][name]["error"] = str(e)
    study["seconds"] = round(time.perf_counter() - started, 1)
    write(study, out)
    print(table(study))
    print(f"wrote {out / 'study.json'} and {out / 'study.png'} in {study['seconds']:.0f} s")
    if failed:
        sys.exit("failed: " + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in failed.items()))


if __name__ == "__main__":
    main()
