"""experiments/e2e_bench.py's scoring: all references of an MR, uneven reference counts."""

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
