"""`make_tiny`: a small random Llama with a BPE tokenizer trained here and a chat template (tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ballast.engine.tools.common import CHATML_TEMPLATE, atomic_dir, publish, write_json

_CORPUS = """The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the moon.
Ballast serves models in production: fast, cheap and without outages. Tokens flow through a paged
KV cache; prefix caching reuses blocks that many prompts share. Continuous batching keeps the engine
busy. Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2026 appear too. Café, naïve, 日本語, emoji 🙂 and
other unicode text make sure byte-level tokenization round-trips. def add(a, b): return a + b
{"key": "value", "list": [1, 2, 3]} — punctuation! questions? yes; no: maybe.
"""



def make_tiny(out: str | Path, *, vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4,
              kv_heads: int = 2, intermediate: int = 128, max_positions: int = 2048, seed: int = 0) -> Path:
    """Write a tiny random Llama checkpoint (config, safetensors, tokenizer, chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    target = Path(out)
    tmp = atomic_dir(target)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    tok.save(str(tmp / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|im_end|>")
    bos = tok.token_to_id("<|endoftext|>")
    write_json(tmp / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": max_positions,
        "chat_template": CHATML_TEMPLATE, "add_bos_token": False, "clean_up_tokenization_spaces": False,
    })
    head_dim = hidden // heads
    write_json(tmp / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": max_positions, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "hidden_act": "silu", "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float32",
    })
    write_json(tmp / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(vocab, hidden, std=0.5),
                                  "model.norm.weight": 1 + w(hidden, std=0.1), "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
        t[p + "mlp.gate_proj.weight"] = w(intermediate, hidden)
        t[p + "mlp.up_proj.weight"] = w(intermediate, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, intermediate)
        t[p + "input_layernorm.weight"] = 1 + w(hidden, std=0.1)
        t[p + "post_attention_layernorm.weight"] = 1 + w(hidden, std=0.1)
    save_file({k: v.contiguous() for k, v in t.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    publish(tmp, target)
    return target
