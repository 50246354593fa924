"""The two-stage flow: search ranks with autolora, then train fresh LoRA adapters at those ranks
with ``peft_config(plan)``: through ``trl.SFTTrainer`` and through PEFT + HF ``Trainer``."""

import pytest
import torch

from autolora import AutoLoRATrainer, peft_config
from autolora.run import lm
from experiments.tiny_lm import make_tiny_lm

ROWS = [
    {"prompt": f"name[{w}] area[{a}]\n", "completion": f"{w} is by the {a}."}
    for w in "ABCDEF"
    for a in ("city", "river")
]


def _rows():
    yield from ROWS


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


def _plan(folder):
    """A short AutoLoRA search on the tiny Llama, pruned to a plan {module: rank}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    data = lm.LMData([lm.encode_completion(tok, r["prompt"], r["completion"], 64)[0] for r in ROWS])
    trainer = AutoLoRATrainer(
        AutoModelForCausalLM.from_pretrained(folder), max_rank=4, target_modules="all-linear", hypergrad="first_order"
    )
    trainer.fit(lm.make_lm_batches(data, 4, lm.pad_id(tok)), epochs=1)
    with pytest.warns(Warning):  # a short search cannot separate ranks: RankWarning
        plan = trainer.prune(target_rank=2, min_rank=1)
    return plan, tok


def _check_ranks(peft_model, plan):
    for name, r in plan.items():
        layer = peft_model.base_model.model.get_submodule(name)
        assert layer.lora_A["default"].weight.shape[0] == r, name


def test_trl_sft_trainer_trains_from_peft_config(tiny_lm, tmp_path):
    pytest.importorskip("trl")
    from datasets import IterableDataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    plan, tok = _plan(tiny_lm)
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        max_length=64,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    sft = SFTTrainer(
        model=model,
        args=args,
        # an IterableDataset: Dataset.from_list fails to fingerprint under some datasets/pyarrow pairs
        train_dataset=IterableDataset.from_generator(_rows),
        processing_class=tok,
        peft_config=peft_config(plan, task_type="CAUSAL_LM"),
    )
    _check_ranks(sft.model, plan)
    out = sft.train()
    assert out.global_step == 3 and torch.isfinite(torch.tensor(out.training_loss))
    trained = [p for n, p in sft.model.named_parameters() if "lora_B" in n]
    assert trained and all(p.abs().sum() > 0 for p in trained)  # B starts at zero: it moved
    sft.model.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_peft_and_hf_trainer_train_from_peft_config(tiny_lm, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    plan, tok = _plan(tiny_lm)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm), peft_config(plan, task_type="CAUSAL_LM"))
    _check_ranks(model, plan)
    data = [lm.encode_completion(tok, r["prompt"], r["completion"], 64)[0] for r in ROWS]
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=lambda rows: lm.collate(rows, lm.pad_id(tok))
    )
    assert trainer.train().global_step == 2
