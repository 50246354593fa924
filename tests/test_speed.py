"""experiments/speed.py: the SmolLM2 shape is what issue 18 names, and every case of it runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
speed = pytest.importorskip("speed")  # imports speedcases (peft) the way the script does
speedcases = sys.modules["speedcases"]

CASES = ("peft_lora", "plain", "first_order", "first_order_every4", "darts", "unrolled")


def test_smollm2_shape_has_210_adapted_modules_and_smollm2_135m_size():
    setup = speedcases.SETUPS["smollm2-135m"]
    with torch.device("meta"):
        model = setup.model(0)
    kinds = set(setup.targets)
    adapted = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in kinds]
    assert len(kinds) == 7 and len(adapted) == 210
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert model.config.num_key_value_heads == 3 and model.config.num_attention_heads == 9
    assert model.config._attn_implementation == "sdpa"  # math_attention() switches it for unrolled
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    assert (setup.batch, setup.length, setup.causal, setup.modules_to_save) == (16, 128, True, ())


def test_causal_batches_label_the_input_ids():
    setup = speedcases.SETUPS["smollm2-tiny"]
    (batch,) = speedcases.make_batches(setup, 1, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["input_ids"].shape == (4, 16)
    assert batch["use_cache"] is False  # PEFT's step runs the forward autolora's default loss runs


def test_default_run_is_the_roberta_shape_alone():
    plan = speed.resolve(speed.parse_args(["--tiny", "--device", "cpu"]))
    assert [s.name for s in plan.setups] == ["roberta-tiny"]
    with pytest.raises(SystemExit):
        speed.parse_args(["--model-shape", "gpt9"])


def test_every_case_of_both_shapes_runs_in_one_invocation(tmp_path):
    out = tmp_path / "speed.md"
    argv = ["--device", "cpu", "--tiny", "--model-shape", "roberta,smollm2", "--rounds", "1"]
    speed.main([*argv, "--iters", "1", "--warmup", "0", "--cases", ",".join(CASES), "--out", str(out)])
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    timed = [r for r in rows if not r.get("summary")]
    assert {(r["setup"], r["case"]) for r in timed} == {(s, c) for s in ("roberta-tiny", "smollm2-tiny") for c in CASES}
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    text = out.read_text()
    assert "## `roberta-tiny`" in text and "## `smollm2-tiny`" in text and "PEFT LoRA r=4" in text
    assert "≤ 0.9× / ≤ 1.05×" in text and "≤ 4× / ≤ 2.5×" in text  # issue 18's targets
