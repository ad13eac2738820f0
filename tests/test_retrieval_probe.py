"""bench/retrieval_probe.py relay-ab at toy sizes: both models train on the same batches and every held-out
document is scored once, in exactly one of the two groups."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import retrieval_probe  # noqa: E402


def test_relay_ab_scores_every_heldout_document_once(capsys):
    out = retrieval_probe.relay_ab(steps=2, docs=400, heldout=40)["final"]
    assert set(out) == {"full", "power"}
    totals = {name: sum(n for _, n in groups.values()) for name, groups in out.items()}
    assert totals["full"] == totals["power"] > 0
    assert out["full"]["one_hop"][1] == out["power"]["one_hop"][1]  # the grouping is the pattern's, not the model's
    assert all(0 <= hit <= n for groups in out.values() for hit, n in groups.values())
    assert "step 2" in capsys.readouterr().out


def test_relay_ab_trains_one_model_alone_as_beside_the_other_and_scores_as_it_goes():
    both = retrieval_probe.relay_ab(steps=3, docs=400, heldout=40)
    alone = retrieval_probe.relay_ab(steps=3, docs=400, heldout=40, models=("power",), eval_every=2)
    assert set(alone["final"]) == {"power"} and alone["final"]["power"] == both["final"]["power"]
    assert alone["answer_nll"]["power"] == both["answer_nll"]["power"]  # bitwise: same init, same batches
    assert [point["step"] for point in alone["curve"]] == [2, 3]


def test_needle_distances_counts_every_passkey_document_and_sees_the_depth_skew(tmp_path):
    small = [f"data.cache_dir={tmp_path}", "data.synthetic.num_docs=60", "data.synthetic.task_fraction=1.0",
             "data.synthetic.tasks=[passkey,repeat]", "data.synthetic.min_sentences=30",
             "data.synthetic.max_sentences=60"]
    uniform = retrieval_probe.needle_distances(small, thresholds=(0, 300))
    skewed = retrieval_probe.needle_distances([*small, "data.synthetic.depth_power=8"], thresholds=(0, 300))
    assert uniform["passkey"] == skewed["passkey"] == 30
    assert uniform["farther"][0] == 30  # every needle is before its document's end
    assert skewed["farther"][300] > uniform["farther"][300]
