"""Tiny transformers built locally (nothing downloaded), saved with ``save_pretrained``.

A byte-level BPE tokenizer is trained on a few hundred standard-library docstrings; the
GPT-2 one adds no special tokens, the Llama one prefixes BOS (as Llama's does).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

from app.extraction.text import stdlib_docstrings


def _tokenizer(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    docs = list(itertools.islice(stdlib_docstrings(), 300))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                          special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token=None if not bos else "<pad>")


def build_all(root: Path) -> dict[str, Path]:
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                              LlamaForCausalLM, T5Config, T5Model)

    torch.manual_seed(0)
    plain, with_bos = _tokenizer(bos=False), _tokenizer(bos=True)
    vocab = len(plain)
    ids = {"bos_token_id": plain.bos_token_id, "eos_token_id": plain.eos_token_id}
    specs = {
        "gpt2": (plain, GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=256,
                                                   **ids))),
        "neox": (plain, GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3,
                                                          num_attention_heads=4, intermediate_size=64,
                                                          max_position_embeddings=256, **ids))),
        "llama": (with_bos, LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=3, num_attention_heads=4,
                                                         num_key_value_heads=2, max_position_embeddings=256,
                                                         pad_token_id=with_bos.pad_token_id, **ids))),
        "t5": (plain, T5Model(T5Config(vocab_size=vocab, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                                      eos_token_id=plain.eos_token_id, pad_token_id=plain.eos_token_id,
                                      decoder_start_token_id=plain.eos_token_id))),
    }
    paths = {}
    for name, (tokenizer, model) in specs.items():
        folder = root / name
        tokenizer.save_pretrained(folder)
        model.save_pretrained(folder)
        paths[name] = folder
    return paths


def build_trained_gpt2(root: Path, steps: int = 150) -> Path:
    """A tiny GPT-2 trained for a few seconds on standard-library docstrings: its next-token loss
    depends on its activations, so splicing a good SAE in must land between clean and ablated."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer = _tokenizer(bos=False)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=3, n_head=4, n_positions=256,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    ids = [t for doc in itertools.islice(stdlib_docstrings(), 400) for t in tokenizer(doc)["input_ids"]]
    data = torch.tensor(ids[:len(ids) // 64 * 64]).view(-1, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(len(data), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = root / "gpt2-trained"
    tokenizer.save_pretrained(folder)
    model.eval().save_pretrained(folder)
    return folder
