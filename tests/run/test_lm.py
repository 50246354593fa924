"""Causal-LM rows, masks, truncation, batches and the dev loss, on the tiny byte-level Llama."""

import json
import math

import pytest
import torch

from autolora import DataError
from autolora.run import lm
from experiments.tiny_lm import make_tiny_lm


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="module")
def tok(tiny_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


def test_prompt_completion_ids_and_mask(tok):
    ex, cut = lm.encode_completion(tok, "ab", "cd", 64)
    p, c = tok("ab")["input_ids"], tok("cd", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == [*p, *c, tok.eos_token_id] and not cut
    assert ex.labels == [-100] * len(p) + [*c, tok.eos_token_id]


def test_truncation_cuts_the_prompt_from_the_left_never_the_completion(tok):
    ex, cut = lm.encode_completion(tok, "abcdefgh", "XY", 6)
    assert cut and len(ex.input_ids) == 6
    assert tok.decode(ex.input_ids) == "<s>ghXY</s>"  # BOS kept, then the prompt's end
    assert [y for y in ex.labels if y != -100] == ex.input_ids[3:]
    with pytest.raises(DataError, match="leaves no room for the prompt"):
        lm.encode_completion(tok, "ab", "XYZWV", 6)


def test_chat_rows_label_only_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]
    ex, cut = lm.encode_chat(tok, messages, 512)
    learned = tok.decode([t for t, y in zip(ex.input_ids, ex.labels) if y != -100])
    assert learned == "yo<|im_end|>\nok<|im_end|>\n" and not cut
    with pytest.raises(DataError, match="no assistant turn"):
        lm.encode_chat(tok, messages[:2], 512)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_files_jsonl_csv_and_chat(tmp_path, tok):
    rows = [{"q": f"q{i}", "a": f"answer {i}"} for i in range(5)]
    data = lm.load_lm_file(_jsonl(tmp_path / "t.jsonl", rows), tok, 64, prompt_column="q", completion_column="a")
    assert len(data) == 5 and data.truncated == 0 and data.rows[0]["q"] == "q0"
    csv = tmp_path / "t.csv"
    csv.write_text('prompt,completion\n"a, b",c\nd,"multi\nline"\n')
    data = lm.load_lm_file(csv, tok, 64, prompt_template="In: {prompt}\nOut:")
    assert tok.decode(data.examples[0].input_ids) == "<s>In: a, b\nOut:c</s>"
    chat = _jsonl(
        tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    )
    assert lm.load_lm_file(chat, tok, 64).label_tokens == len(
        tok("y<|im_end|>\n", add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "a"}, r"t.jsonl:3: missing field\(s\) \['completion'\]"),
        ({"prompt": "a", "completion": "  "}, r"t.jsonl:3: the completion \('completion'\) is empty"),
        ({"prompt": "a", "completion": "x" * 70}, "t.jsonl:3: the completion is 71 tokens"),
        ({"messages": "not a list"}, "t.jsonl:3: "),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, tok, row, message):
    path = tmp_path / "t.jsonl"
    good = row if "messages" in row else {"prompt": "p", "completion": "c"}
    if "messages" in row:
        good = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        lm.load_lm_file(path, tok, 64)


def test_csv_line_numbers_count_multiline_cells(tmp_path, tok):
    path = tmp_path / "t.csv"
    path.write_text('prompt,completion\na,"two\nlines"\nb,\n')
    with pytest.raises(DataError, match=r"t\.csv:4: the completion"):
        lm.load_lm_file(path, tok, 64)


def test_batches_pad_right_and_group_by_length(tok):
    data = lm.LMData([lm.LMExample(list(range(n)), [-100, *range(1, n)]) for n in (3, 9, 4, 8, 2, 7)])
    (b, *_) = lm.make_lm_batches(data, 2, pad_id=99)
    assert b["input_ids"].tolist() == [[0, 1, 2, 99, 99, 99, 99, 99, 99], list(range(9))]
    assert b["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert b["labels"][0].tolist() == [-100, 1, 2] + [-100] * 6
    grouped = lm.make_lm_batches(data, 2, 99, shuffle=True, seed=3, group_by_length=True)
    widths = sorted(g["input_ids"].shape[1] for g in grouped)
    assert widths == [3, 7, 9] and sum(int(g["attention_mask"].sum()) for g in grouped) == 33


def test_dev_loss_is_token_weighted_and_batch_independent(tiny_lm, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    rows = [lm.encode_completion(tok, f"prompt {i}", "x" * (1 + 3 * i), 64)[0] for i in range(5)]
    data = lm.LMData(rows)
    one = lm.dev_loss(model, lm.make_lm_batches(data, 1, lm.pad_id(tok)))
    many = lm.dev_loss(model, lm.make_lm_batches(data, 4, lm.pad_id(tok)))
    assert one["dev_loss"] == pytest.approx(many["dev_loss"], rel=1e-5)
    assert one["dev_tokens"] == data.label_tokens == sum(2 + 3 * i for i in range(5))
    assert one["perplexity"] == pytest.approx(math.exp(one["dev_loss"]))
    # the HF loss on one row is the same mean over its completion tokens
    b = lm.collate([rows[2]], lm.pad_id(tok))
    single = lm.dev_loss(model, [b])["dev_loss"]
    with torch.no_grad():
        assert float(model(**b).loss) == pytest.approx(single, rel=1e-5)


def test_generation_stops_at_the_eos_the_rows_end_with(tiny_lm, tok, monkeypatch):
    """A model's generation_config may name another eos (a GGUF SmolLM2 names <|endoftext|>, its
    rows end with <|im_end|>): greedy decoding must stop where the training rows stop."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    model.generation_config.eos_token_id = 0
    seen, real = {}, model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.update(kw) or real(**kw))
    lm.generate(model, tok, "name[x]", 3)
    assert seen["eos_token_id"] == lm.eos_id(tok) == tok.eos_token_id != 0


def test_batched_generation_equals_one_prompt_at_a_time(tiny_lm, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).train()
    prompts = ["name[a]", "name[Alimentum], area[city centre]", "x"]
    batched = lm.generate_batch(model, tok, prompts, 4, batch_size=3)
    assert batched == [lm.generate(model, tok, p, 4) for p in prompts]
    assert model.training and tok.padding_side == "right"  # both restored
