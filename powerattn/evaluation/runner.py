"""What `python eval.py` does: check the config, load the checkpoint, run one task, write results.json + PNG.

Every check that needs no model (folder, tokenizer, pattern, task parameters, prompt lengths) runs
before the weights are read. The PNG is written first and results.json last, each atomically, so a
results.json in a folder means that run finished.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from powerattn.atomic import atomic_write
from powerattn.data.synthetic import make_task, passkey
from powerattn.data.tokenizer import Tokenizer
from powerattn.dtypes import DTYPES
from powerattn.evaluation import plots
from powerattn.evaluation.config import check_eval_config
from powerattn.evaluation.coverage import run_receptive_field
from powerattn.evaluation.passkey import cell_seed, check_lengths, passkey_grid, resolve_depths
from powerattn.evaluation.perplexity import MODES, heldout_stores, run_perplexity
from powerattn.evaluation.ruler import check_tasks, run_ruler
from powerattn.model import from_pretrained, load_config, resolve_attention_schedule
from powerattn.patterns import Pattern, pattern_from_dict

log = logging.getLogger(__name__)

SCHEMA = "powerattn.eval/1"
def auto_lengths(max_len: int, count: int, minimum: int = 256) -> list[int]:
    """`count` doubling lengths ending at max_len (none below `minimum` unless max_len is)."""
    out = [max_len >> k for k in reversed(range(count)) if max_len >> k >= minimum]
    return out or [max_len]


def resolve_pattern(spec, saved: Mapping | None) -> tuple[Pattern | None, Any]:
    """(pattern, schedule) of a `pattern` override: None (keep the checkpoint's), a pattern name, or a
    mapping {name: ..., <params>, schedule: ...} as in the training configs' pattern section.

    An unset block_size follows the checkpoint's training pattern (else the pattern's default); the
    schedule (full-attention layers) is None unless the mapping sets one.
    """
    if spec is None:
        return None, None
    if isinstance(spec, str):
        spec = {"name": spec}
    elif not isinstance(spec, Mapping):
        raise ValueError(f"pattern must be null, a name or a mapping with `name`, got {spec!r}")
    elif not isinstance(spec.get("name"), str):
        raise ValueError(f"pattern override {dict(spec)} needs a `name` (e.g. full, power)")
    if "block_size" not in spec and saved and "block_size" in saved:
        spec = {**spec, "block_size": saved["block_size"]}
    return pattern_from_dict(spec), spec.get("schedule")


class Job:
    """A checked evaluation config: everything resolved that can be without reading the weights."""

    def __init__(self, cfg):
        e = check_eval_config(cfg)
        self.cfg = asdict(e)
        self.checkpoint = Path(e.checkpoint).expanduser().resolve()
        self.task = dict(e.task) if isinstance(e.task, Mapping) else {"name": e.task}
        self.name = self.task["name"]
        self.model_config = load_config(self.checkpoint)
        self.saved = self.model_config.hf_extra.get("powerattn") or {}
        self.pattern, self.schedule = resolve_pattern(e.pattern, self.saved.get("pattern"))
        if e.attention_schedule is not None:
            self.schedule = e.attention_schedule
        if self.schedule is None and self.pattern is not None:  # an override keeps the hybrid layers
            self.schedule = self.saved.get("full_attention_layers") or None
        self.tokenizer = Tokenizer.from_pretrained(e.tokenizer or self.checkpoint)
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise ValueError(f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} pieces, "
                             f"more than the model's vocab_size {self.model_config.vocab_size}")
        device = e.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = e.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = DTYPES[dtype]
        self.backend = e.backend
        resolve_attention_schedule(self.schedule, self.model_config.num_hidden_layers)  # raises on a bad one
        self.batch_size = e.batch_size
        self.seed, self.progress = e.seed, e.progress
        self.output_dir = Path(e.output_dir).expanduser()
        self._check_task()

    def _check_task(self) -> None:
        """Fill defaults and automatic lengths; fail now on what the task would reject later."""
        t, max_pos = self.task, self.model_config.max_position_embeddings
        if self.name == "receptive_field":
            t["length"] = check_lengths([t.get("length") or max_pos], "length")[0]
            lengths = [t["length"]]
        else:
            lengths = t["lengths"] = check_lengths(
                t.get("lengths") or auto_lengths(max_pos, 4 if self.name == "ruler" else 6))
        if max(lengths) > max_pos:
            log.warning("eval: %d tokens exceed the checkpoint's max_position_embeddings %d",
                        max(lengths), max_pos)
        if self.name in ("passkey", "ruler", "receptive_field"):
            t["samples"] = int(t.get("samples") or 1)
        if self.name in ("passkey", "receptive_field"):
            t["depths"] = resolve_depths(t.get("depths", 10))
            t["digits"] = int(t.get("digits") or 5)
            passkey(0, depth=0.0, digits=t["digits"]).to_tokens(self.tokenizer, min(lengths))
        elif self.name == "ruler":
            t["tasks"] = check_tasks(t.get("tasks"))
            for name, params in t["tasks"].items():
                make_task(name, cell_seed(self.seed, name), **params).to_tokens(self.tokenizer, min(lengths))
        elif self.name == "ppl":
            t.setdefault("mode", "documents")
            if t["mode"] not in MODES:
                raise ValueError(f"ppl: mode must be one of {MODES}, got {t['mode']!r}")
            t["buckets"] = int(t.get("buckets") or 8)
            t["tokens_per_length"] = int(t.get("tokens_per_length") or 262144)
            t["cache_dir"] = t.get("cache_dir") or ".cache/powerattn_data"
            t["text_field"] = t.get("text_field") or "text"

    def load_model(self):
        model = from_pretrained(self.checkpoint, pattern=self.pattern, dtype=self.dtype,
                                attention_schedule=self.schedule, device=self.device, backend=self.backend)
        return model.eval()


def _passkey(job: Job, model, png: Path, title: str) -> tuple[dict, dict]:
    t = job.task
    grid = passkey_grid(model, job.tokenizer, t["lengths"], t["depths"], t["samples"], job.seed, t["digits"],
                        job.batch_size, job.progress)
    results = {"lengths": grid.lengths, "depths": grid.depths, "samples": grid.samples, "digits": t["digits"],
               "accuracy": grid.accuracy(), "accuracy_by_length": grid.by_length(),
               "accuracy_by_depth": grid.by_depth(), "mean_accuracy": grid.mean(), "records": grid.records}
    summary = {"mean_accuracy": grid.mean(),
               "accuracy_by_length": dict(zip(map(str, grid.lengths), grid.by_length()))}
    plots.passkey_heatmap(results, png, f"passkey, mean {100 * grid.mean():.0f}%\n{title}")
    return results, summary


def _ruler(job: Job, model, png: Path, title: str) -> tuple[dict, dict]:
    t = job.task
    results = run_ruler(model, job.tokenizer, t["lengths"], t["samples"], t["tasks"], job.seed,
                        job.batch_size, job.progress)
    summary = {"average": _mean(results["average"]),
               "average_by_length": dict(zip(map(str, results["lengths"]), results["average"]))}
    plots.ruler_plot(results, png, f"RULER-style tasks\n{title}")
    return results, summary


def _ppl(job: Job, model, png: Path, title: str, stores) -> tuple[dict, dict]:
    t = job.task
    results = run_perplexity(model, job.tokenizer, t["lengths"], stores, t["tokens_per_length"], t["buckets"],
                             t["mode"], job.batch_size, job.progress)
    summary = {"ppl_by_length": {str(r["length"]): r["ppl"] for r in results["per_length"]}}
    plots.ppl_plot(results, png, f"perplexity - {title}")
    return results, summary


def _receptive_field(job: Job, model, png: Path, title: str) -> tuple[dict, dict]:
    t = job.task
    results = run_receptive_field(model, job.tokenizer, t["length"], t["depths"], t["samples"], model.pattern,
                                  model.full_attention_layers, model.config.num_hidden_layers, job.seed,
                                  job.batch_size, job.progress)
    theory = results["theory"]
    summary = {"coverage": theory["coverage"], "layers_to_full": theory["layers_to_full"],
               "mean_accuracy": _mean(results["measured"]["accuracy"]), **results["agreement"]}
    plots.receptive_field_plot(results, png, f"receptive field vs passkey - {title}")
    return results, summary


_RUNNERS = {"passkey": _passkey, "ruler": _ruler, "ppl": _ppl, "receptive_field": _receptive_field}


def run(cfg) -> Path:
    """Run the configured task; returns the path of the results.json written."""
    job = Job(cfg)
    start = time.perf_counter()
    extra = ()
    if job.name == "ppl":  # tokenising the corpus is cheap next to loading a model: fail on it first
        t = job.task
        extra = (heldout_stores(job.tokenizer, t.get("data"), t["cache_dir"], t["text_field"]),)
    model = job.load_model()
    job.output_dir.mkdir(parents=True, exist_ok=True)
    png = job.output_dir / f"{job.name}.png"
    title = f"{job.checkpoint.name}: {_pattern_label(model)}"
    results, summary = _RUNNERS[job.name](job, model, png, title, *extra)
    out = {
        "schema": SCHEMA, "task": job.name, "checkpoint": str(job.checkpoint), "model": _model_info(model),
        "attention": _attention_info(model, job), "environment": _environment(job), "config": job.cfg,
        "task_config": job.task, "elapsed_s": round(time.perf_counter() - start, 3), "plot": png.name,
        "summary": summary, "results": results,
    }
    path = job.output_dir / "results.json"
    atomic_write(path, json.dumps(_finite(out), indent=1))
    log.info("%s summary: %s", job.name, json.dumps(_finite(summary)))
    log.info("wrote %s and %s", path, png)
    return path


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _pattern_label(model) -> str:
    label = model.pattern.key
    if model.full_attention_layers:
        label += f" + {len(model.full_attention_layers)} full layers"
    return label


def _model_info(model) -> dict:
    c = model.config
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta",
            "rope_scaling")
    return {**{k: getattr(c, k) for k in keys}, "parameters": sum(p.numel() for p in model.parameters())}


def _attention_info(model, job: Job) -> dict:
    if job.pattern is not None:
        source = "override"
    else:
        source = "checkpoint" if job.saved.get("pattern") else "none saved: full attention"
    return {"pattern": {"name": model.pattern.name, **asdict(model.pattern)}, "key": model.pattern.key,
            "full_attention_layers": list(model.full_attention_layers), "source": source,
            "backend": job.backend}


def _environment(job: Job) -> dict:
    if job.device.type == "cuda":
        device = torch.cuda.get_device_name(job.device)
    else:
        device = platform.processor() or platform.machine() or "cpu"
    env = {"device": device, "device_type": job.device.type, "dtype": str(job.dtype).removeprefix("torch."),
           "torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env
