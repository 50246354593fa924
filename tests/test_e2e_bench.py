"""experiments/e2e_bench.py's scoring: all references of an MR, uneven reference counts."""

from pathlib import Path

import pytest

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

from experiments.e2e_bench import nlg_scores


def test_scores_against_all_references():
    refs = [["the cat sat on the mat today", "a cat was on the mat"], ["dogs run in the big park"]]
    assert nlg_scores(["a cat was on the mat", "dogs run in the big park"], refs) == pytest.approx(
        {"bleu": 100.0, "rouge_l": 100.0}
    )
    assert nlg_scores(["nothing alike here", "zzz"], refs)["bleu"] < 5


E2E_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


@pytest.mark.skipif(not (E2E_DATA / "trainset.csv").is_file(), reason="needs ../shared/data/e2e")
def test_bench_runs_every_method_and_the_control_waits_for_published_ranks(tmp_path):
    """The whole bench on the tiny Llama: AutoLoRA publishes its ranks, a separate shuffled run
    (as in the parallel GPU launch) permutes exactly those, a PEFT row trains."""
    import json

    from experiments.e2e_bench import main
    from experiments.tiny_lm import make_tiny_lm

    model, out, ranks_dir = make_tiny_lm(tmp_path / "lm"), tmp_path / "rows.jsonl", tmp_path / "ranks"
    common = ["--cpu", "--limit", "8", "--dev-limit", "2", "--max-length", "512", "--model", str(model)]
    common += ["--data", str(E2E_DATA), "--max-new-tokens", "4", "--epochs", "1", "--batch-size", "4"]
    common += ["--seeds", "0", "--ranks-dir", str(ranks_dir), "--out", str(out)]
    assert main([*common, "--methods", "autolora", "lora-r1"]) == 0
    assert main([*common, "--methods", "shuffled", "--wait", "5"]) == 0
    rows = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"autolora", "lora-r1", "shuffled"}
    published = json.loads((ranks_dir / "autolora_ranks_seed0.json").read_text())
    assert published == rows["autolora"]["ranks"] and rows["shuffled"]["total_rank"] == sum(published.values())
    assert rows["lora-r1"]["total_rank"] == rows["lora-r1"]["modules"] == len(published)
    assert all(0 < r["dev_nll"] < 20 for r in rows.values())
