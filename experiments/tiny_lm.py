"""A tiny random causal LM saved to a folder, for tests and CPU smoke runs of the decoder path.

A 2-layer Llama (GQA, hidden 32) over a byte-level tokenizer (256 bytes + 4 specials, no
merges), with BOS/EOS/pad tokens and a ChatML chat template like SmolLM2's. Any text
tokenises, so it runs on the real E2E and GSM8K files; it learns nothing useful.

    python experiments/tiny_lm.py runs/tiny-llama
"""

from __future__ import annotations

import argparse
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():
    """A byte-level fast tokenizer: ids 0-3 are the specials, then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        additional_special_tokens=SPECIALS[2:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return LlamaForCausalLM(cfg)


def make_tiny_lm(folder: str | Path, seed: int = 0) -> Path:
    """Save the tiny tokenizer and a random tiny Llama into ``folder``; returns it."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(str(folder))
    tiny_llama(len(tokenizer), seed).save_pretrained(str(folder))
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Save a tiny random Llama and its byte-level tokenizer.")
    ap.add_argument("folder", nargs="?", default="runs/tiny-llama")
    print(make_tiny_lm(ap.parse_args().folder))
