"""Causal-LM data: prompt/completion and chat rows, tokenised with the loss on the answer only,
dynamically padded batches, and the dev loss.

A prompt/completion row becomes ``tok(prompt) + tok(completion, no special tokens) + [eos]``
with labels -100 on the prompt; a chat row (``messages``: a list of ``{role, content}``) is
rendered with the tokenizer's chat template and only the assistant turns carry labels. Over
``max_length`` the prompt (for chat: the oldest tokens) is cut from the left, never the
completion. The dev loss is the token-weighted mean NLL over every labelled dev token, so it
does not depend on how the dev rows are batched.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autolora.errors import DataError
from autolora.logging.dashboard import progress_iter
from autolora.run.text import json_records

IGNORE = -100  # the label HF losses skip


@dataclass(frozen=True)
class LMExample:
    """One tokenised row: ``input_ids`` and ``labels`` of equal length (-100 where no loss)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class LMData:
    """The tokenised rows of one file, which of them were truncated, and the raw rows."""

    examples: list[LMExample]
    cut: list[bool] = field(default_factory=list)
    source: str = ""
    rows: list[dict] = field(default_factory=list, repr=False)  # for generation and references

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def truncated(self) -> int:
        """How many rows were cut to fit ``max_length``."""
        return sum(self.cut)

    @property
    def label_tokens(self) -> int:
        return sum(sum(1 for y in e.labels if y != IGNORE) for e in self.examples)

    def subset(self, indices: Sequence[int]) -> LMData:
        pick = lambda xs: [xs[i] for i in indices] if xs else []  # noqa: E731
        return LMData(pick(self.examples), pick(self.cut), self.source, pick(self.rows))


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` of a JSONL, CSV or TSV file with a header (or JSON keys).

    Raises:
        DataError: for a missing file, an unknown suffix or a line that is not JSON.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .tsv.")
    if not path.is_file():
        raise DataError(f"no such data file {str(path)!r}.")
    if suffix == ".jsonl":
        rows = json_records(path)
    else:
        rows = []
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            start = 2
            for row in reader:
                rows.append((start, row))
                start = reader.line_num + 1  # a quoted cell may span lines
    if not rows:
        raise DataError(f"{path} has no rows.")
    return rows


def eos_id(tokenizer) -> int:
    """The id every training row ends with (the tokenizer's eos); generation stops there too."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token; causal-LM rows end with one. Set tokenizer.eos_token.")
    return int(tokenizer.eos_token_id)


def encode_completion(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[LMExample, bool]:
    """``tok(prompt) + tok(completion) + [eos]``, the prompt masked and cut from the left
    (after a leading BOS) to fit ``max_length``; returns (example, truncated).

    Raises:
        DataError: (without a location) if the completion leaves no room for any prompt token.
    """
    p = list(tokenizer(prompt)["input_ids"])
    c = [*tokenizer(completion, add_special_tokens=False)["input_ids"], eos_id(tokenizer)]
    room = max_length - len(c)
    truncated = len(p) > room
    if truncated:
        keep_bos = 1 if p and p[0] == tokenizer.bos_token_id else 0
        if room < 1 + keep_bos:
            raise DataError(
                f"the completion is {len(c)} tokens with eos, which leaves no room for the prompt within "
                f"model.max_length={max_length}; raise max_length or shorten the completion."
            )
        p = p[:keep_bos] + p[len(p) - (room - keep_bos) :]
    return LMExample(p + c, [IGNORE] * len(p) + c), truncated


def _render(tokenizer, messages, **kw) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def encode_chat(tokenizer, messages: Sequence[Mapping], max_length: int) -> tuple[LMExample, bool]:
    """A conversation rendered by the chat template, labels on the assistant turns only (their
    text and the template's end-of-turn marker); the oldest tokens cut to fit ``max_length``.

    Raises:
        DataError: (without a location) for a malformed message list, a template that does not
            render incrementally, or no assistant tokens left after truncation.
    """
    if not (isinstance(messages, list) and messages):
        raise DataError("'messages' must be a non-empty list of {role, content} objects.")
    for m in messages:
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"message {m!r} needs a string 'role' and a string 'content'.")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("the conversation has no assistant turn, so no token would carry a loss.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("chat rows need a tokenizer with a chat template (tokenizer.chat_template is None).")
    text = _render(tokenizer, messages)
    spans = []  # character spans of the assistant turns in `text`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(upto) and upto.startswith(before)):
            raise DataError("the chat template does not render a conversation as the sum of its turns.")
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        t if any(a <= start < b for a, b in spans) else IGNORE for t, (start, _) in zip(ids, enc["offset_mapping"])
    ]
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[-max_length:], labels[-max_length:]
    if all(y == IGNORE for y in labels):
        raise DataError(f"no assistant token is left within model.max_length={max_length}; raise max_length.")
    return LMExample(ids, labels), truncated


def load_lm_file(
    path: str | Path,
    tokenizer,
    max_length: int,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str = "messages",
    prompt_template: str = "{prompt}",
    limit: int | None = None,
    seed: int = 0,
) -> LMData:
    """Tokenise the rows of a file: chat rows if it has ``messages_column``, else
    prompt/completion rows (``prompt_template`` formats the prompt, e.g. ``"{prompt}\\n"``).
    ``limit`` keeps a seeded random subset of that many rows (in file order), chosen before
    tokenising, so a small run on a big file is quick.

    Raises:
        DataError: naming the file and line of a bad row (missing field, empty completion, a
            prompt that leaves no room, ...).
    """
    rows = read_rows(path)
    if limit is not None and limit < len(rows):
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]
    chat = messages_column in rows[0][1]
    examples, cuts, raw = [], [], []
    for line_no, row in rows:
        where = f"{path}:{line_no}"
        try:
            if chat:
                messages = row.get(messages_column)
                if isinstance(messages, str):  # CSV/TSV cells hold the list as JSON
                    try:
                        messages = json.loads(messages)
                    except json.JSONDecodeError:
                        raise DataError(f"column {messages_column!r} is not a JSON list of messages.") from None
                example, cut = encode_chat(tokenizer, messages, max_length)
            else:
                missing = [c for c in (prompt_column, completion_column) if row.get(c) is None]
                if missing:
                    raise DataError(f"missing field(s) {missing}; the row has {sorted(k for k in row if k)}.")
                prompt, completion = str(row[prompt_column]), str(row[completion_column])
                if not completion.strip():
                    raise DataError(f"the completion ({completion_column!r}) is empty.")
                example, cut = encode_completion(
                    tokenizer, prompt_template.format(prompt=prompt), completion, max_length
                )
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        examples.append(example)
        cuts.append(cut)
        raw.append(row)
    return LMData(examples, cuts, str(path), raw)


def collate(examples: Sequence[LMExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` (B, T), ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_lm_batches(
    data: LMData,
    batch_size: int,
    pad_id: int,
    shuffle: bool = False,
    seed: int = 0,
    group_by_length: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` rows, each padded to its own longest row.

    ``group_by_length`` sorts rows by length inside seeded chunks of 50 batches (as HF's
    length-grouped sampler does), so a batch wastes little on padding; the batch order is then
    shuffled when ``shuffle``.
    """
    order = list(range(len(data)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        chunk = 50 * batch_size
        order = [
            i
            for start in range(0, len(order), chunk)
            for i in sorted(order[start : start + chunk], key=lambda j: -len(data.examples[j].input_ids))
        ]
    groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length and shuffle:
        rng.shuffle(groups)
    return [collate([data.examples[i] for i in g], pad_id) for g in groups]


def pad_id(tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else its eos (padding carries no loss)."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer))


def dev_loss(model, batches, progress: bool = True) -> dict[str, float]:
    """Token-weighted mean NLL over the labelled tokens of ``batches`` (eval mode, no grad); a
    progress bar on a terminal unless ``progress=False``.

    Returns:
        ``{"dev_loss": nats per token, "perplexity": exp of it, "dev_tokens": count}``.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in progress_iter(batches, "dev loss", progress):
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            logits = logits.logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
            target = batch["labels"][:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
            total += float(nll)
            count += int((target != IGNORE).sum())
    model.train(was_training)
    if count == 0:
        raise DataError("the dev data has no labelled tokens to score.")
    loss = total / count
    return {"dev_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "dev_tokens": count}


def generate_batch(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16, progress: bool = True
) -> list[str]:
    """Greedy continuations of ``prompts`` (the new text only), batched with left padding, each
    ending at the tokenizer's eos: the token the training rows end with, which a model's
    ``generation_config`` may not name (a GGUF-loaded SmolLM2 lists ``<|endoftext|>``, its rows
    end with ``<|im_end|>``). The model's train/eval mode and the tokenizer's padding side are
    restored. A progress bar on a terminal for more than one batch unless ``progress=False``."""
    device, out = next(model.parameters()).device, []
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    try:
        with torch.no_grad():
            starts = range(0, len(prompts), batch_size)
            for start in progress_iter(starts, "generating", progress and len(starts) > 1):
                chunk = prompts[start : start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=len(chunk) > 1).to(device)
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id(tokenizer),
                    eos_token_id=eos_id(tokenizer),
                )
                out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return out


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy continuation of ``prompt`` (the new text only); see :func:`generate_batch`."""
    return generate_batch(model, tokenizer, [prompt], max_new_tokens)[0]
