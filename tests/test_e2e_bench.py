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


def _row(method: str, seed: int, nll: float, **extra) -> dict:
    return {
        "method": method, "seed": seed, "dev_nll": nll, "bleu": 60.0 + seed, "rouge_l": 65.0, "total_rank": 840,
        "train_seconds": 100.0, "eval_seconds": 10.0, "train_rows": 3000, "dev_mrs": 200, "device": "cuda", **extra,
    }  # fmt: skip


def test_table_pairs_by_seed_and_reports_the_pipeline_ratio():
    """e2e_table: AutoLoRA minus the matched uniform LoRA per seed (lower NLL counts as better),
    its search time, seed agreement, mean rank per kind and the pipeline ratio."""
    from experiments.e2e_table import render

    ranks = {f"model.layers.{i}.self_attn.v_proj": 1 + i for i in range(3)}
    ranks |= {f"model.layers.{i}.mlp.up_proj": 6 - i for i in range(3)}
    rows = [_row("lora-r4", s, 1.20) for s in (0, 1)] + [
        _row("autolora", 0, 1.19, train_seconds=150.0, search_seconds=50.0, ranks=ranks, confidence={"x": 0.4}),
        _row("autolora", 1, 1.21, train_seconds=130.0, search_seconds=40.0, ranks=ranks, confidence={"x": 1.0}),
    ]
    text = render("rows.jsonl", rows)
    assert "dev NLL / token -0.0100, +0.0100 (better on 1/2)" in text
    assert "| autolora | 2 | 1.2000 ± 0.0141 |" in text and "(search 45.0 ± 7.1)" in text
    assert "1.50×, 1.30× (mean 1.40×)" in text
    assert "seed agreement (per-module ranks, Spearman): 1.00 (1 pairs)" in text
    assert "| 0 | — | — | 2.00 | — | — | 5.00 | — | 0.4 |" in text  # v 1,2,3 and up 6,5,4: means 2 and 5
    assert "AutoLoRA − shuffled" not in text  # no shuffled rows, no such line
