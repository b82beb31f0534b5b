"""Tiny random models with a small byte-level BPE tokenizer.

Used by the tests, the TUI pilot tests and quick demos (``--model tiny:llama``):
they load in well under a second, need no download, and exercise the same code
paths as a real model (chat template, tied embeddings, GPT-2's Conv1D).

:data:`ARCHS` are the public ``tiny:`` names (llama, gpt2, qwen2).
:data:`ALL_ARCHS` is every family :mod:`backends.arch` has an adapter for;
:func:`config` builds a tiny random config for each of them, so the
architecture drift guard (``tests/test_families.py``) can load every family
through the real loader and run the editors on it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

ARCHS = ("llama", "gpt2", "qwen2")
# every family with an adapter in backends.arch.SPECS (tests/test_families.py checks the two agree)
ALL_ARCHS = ("llama", "gpt2", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "olmo", "gptj", "gpt_neox", "phi",
             "phi3")

_CORPUS = """
What is the capital of France? The capital of France is Paris.
Who wrote the play Hamlet? William Shakespeare wrote Hamlet.
What is the largest planet in the solar system? Jupiter is the largest planet.
How many days are there in a week? There are seven days in a week.
What colour is the sky on a clear day? The sky is blue.
Which element has the chemical symbol O? Oxygen has the symbol O.
I'm sorry, I don't know the answer to that question. I cannot help with that.
The quick brown fox jumps over the lazy dog. Answer the question briefly.
Question Answer user assistant system forgotten refusal demonstration
"""

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@lru_cache(maxsize=1)
def _tokenizer_json(vocab_size: int = 600) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<|user|>",
                                                                         "<|assistant|>", "<|system|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def tokenizer(chat: bool = True):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def config(arch: str, vocab_size: int, layers: int = 4, hidden: int = 32, mlp: int = 64):
    """A tiny config for ``arch`` (any of :data:`ALL_ARCHS`): 4 heads of width ``hidden // 4``."""
    import transformers as tf

    common: dict[str, Any] = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              tie_word_embeddings=False, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_inner=mlp, n_layer=layers, n_head=4, n_positions=512,
                             tie_word_embeddings=True, **common)
    # the other families: only the drift guard builds these.  Tied and untied unembeddings, full and
    # partial rotary embeddings, parallel residuals, fused MLP inputs and Gemma's embedding scaling
    # (plus Gemma 2's soft-capping and sliding window) are all represented.
    head_dim = hidden // 4
    llama_like = dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "mistral":
        return tf.MistralConfig(head_dim=head_dim, sliding_window=256, tie_word_embeddings=False, **llama_like)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=head_dim, tie_word_embeddings=True, **llama_like)
    if arch == "gemma":
        return tf.GemmaConfig(head_dim=head_dim, tie_word_embeddings=True, **llama_like)
    if arch == "gemma2":
        return tf.Gemma2Config(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=256,
                               tie_word_embeddings=True, **llama_like)
    if arch == "olmo":
        return tf.OlmoConfig(tie_word_embeddings=False, **llama_like)
    if arch == "phi3":
        return tf.Phi3Config(tie_word_embeddings=False, original_max_position_embeddings=512, **llama_like)
    if arch == "phi":
        return tf.PhiConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                            tie_word_embeddings=False, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                                num_attention_heads=4, max_position_embeddings=512, use_parallel_residual=True,
                                tie_word_embeddings=False, **common)
    if arch == "gptj":
        return tf.GPTJConfig(n_embd=hidden, n_inner=mlp, n_layer=layers, n_head=4, n_positions=512,
                             rotary_dim=head_dim // 2, tie_word_embeddings=False, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ALL_ARCHS}")


def build(arch: str = "llama", seed: int = 0, chat: bool = True, layers: int = 4, hidden: int = 32,
          mlp: int = 64):
    """(model, tokenizer) with deterministic random weights."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = tokenizer(chat)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(arch, len(tok), layers, hidden, mlp), dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    # random tied weights mostly echo the last prompt token (a special one): keep specials other than
    # end-of-sequence out of generations so tests see real text
    model.generation_config.suppress_tokens = [i for i in tok.all_special_ids if i != tok.eos_token_id]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def handle(arch: str = "llama", seed: int = 0, chat: bool = True, **kw):
    from .model import ModelHandle

    model, tok = build(arch, seed, chat, **kw)
    return ModelHandle(model, tok, name=f"tiny:{arch}", device="cpu", source="random")
