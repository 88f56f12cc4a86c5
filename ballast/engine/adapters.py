"""Adapters of one engine: a registry (name → path, thousands are fine), an LRU of adapters read into CPU
memory (`max_cpu_loras`) and an LRU of device slots (`max_loras`) holding the stacked LoRA tensors that
`lora_layers` computes with.

Threads: `register` / `unregister` are called from the server (the file is read outside the lock); slots
are only touched by the engine thread, between and during steps. A sequence holds its `LoraRef`, so an
adapter unregistered while requests use it keeps serving them (reloaded from its path if evicted) while new
requests for the name are refused.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ballast.engine.config import ModelConfig
from ballast.engine.errors import EngineError
from ballast.engine.lora import LoraWeights, read_adapter
from ballast.engine.lora_layers import FUSED, LoraEmbedding, LoraHead, LoraLinear, LoraStep

_uids = itertools.count(1)


@dataclass(frozen=True)
class LoraRef:
    """One registration of an adapter; a re-registration under the same name is a new ref (new uid), so
    prefix-cache blocks of the old weights are never reused for the new ones."""

    name: str
    path: Path
    uid: int
    rank: int

    @property
    def cache_root(self) -> bytes:
        """The root of this adapter's prefix-cache digest chain: no block is shared across adapters."""
        return hashlib.blake2b(f"lora\0{self.uid}\0{self.path}".encode(), digest_size=32).digest()


class AdapterManager:
    def __init__(self, model: nn.Module, mc: ModelConfig, device: torch.device, dtype: torch.dtype, *,
                 max_loras: int, max_cpu_loras: int, max_rank: int):
        if max_loras < 1 or max_cpu_loras < max_loras or not 1 <= max_rank <= 64:
            raise EngineError("need 1 <= max_loras <= max_cpu_loras and 1 <= max_lora_rank <= 64",
                              "invalid_engine_args")
        self.mc, self.device, self.dtype = mc, device, dtype
        self.max_loras, self.max_cpu_loras, self.max_rank = max_loras, max_cpu_loras, max_rank
        self._lock = threading.Lock()
        self._registry: dict[str, LoraRef] = {}
        self._cpu: OrderedDict[int, LoraWeights] = OrderedDict()  # uid → weights, least recently used first
        self._slot_uid: list[int | None] = [None] * max_loras
        self._slot_saved: list[dict[str, torch.Tensor]] = [{} for _ in range(max_loras)]
        self._slot_lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(max_loras))
        self._rank_cap = 0
        self._stacks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.step: LoraStep | None = None
        self.loads = 0  # adapters copied to the device (a metric of slot churn)
        self._wrap(model)

    # ---- the model -------------------------------------------------------------------------
    def _wrap(self, model: nn.Module) -> None:
        get_step = self._get_step
        for i, layer in enumerate(cast("Sequence[Any]", model.layers)):
            for owner, name in ((layer.self_attn, "qkv"), (layer.self_attn, "o_proj"), (layer.mlp, "gate_up"),
                                (layer.mlp, "down_proj")):
                setattr(owner, name, LoraLinear(getattr(owner, name), self._stack_getter(i, name), get_step))
        embed = cast("nn.Embedding", model.embed_tokens)
        model.embed_tokens = LoraEmbedding(embed, self._saved_getter("embed_tokens"), get_step)
        model.lm_head = LoraHead(cast("nn.Linear", model.lm_head), self._saved_getter("lm_head"), get_step)

    def _get_step(self) -> LoraStep | None:
        return self.step

    def _stack_getter(self, layer: int, kind: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor] | None]:
        return lambda: self._stacks.get((layer, kind))

    def _saved_getter(self, module: str) -> Callable[[int], torch.Tensor | None]:
        return lambda slot: self._slot_saved[slot].get(module)

    # ---- registry (any thread) -------------------------------------------------------------
    def register(self, name: str, path: str | Path) -> LoraRef:
        """Read and check the adapter, then publish it under `name` (replacing an older registration)."""
        p = Path(path).resolve()
        weights = read_adapter(p, self.mc, self.max_rank)
        ref = LoraRef(name, p, next(_uids), weights.rank)
        with self._lock:
            self._registry[name] = ref
            self._cache(ref.uid, weights)
        return ref

    def unregister(self, name: str) -> bool:
        with self._lock:
            return self._registry.pop(name, None) is not None

    def get(self, name: str) -> LoraRef | None:
        with self._lock:
            return self._registry.get(name)

    def refs(self) -> list[LoraRef]:
        with self._lock:
            return sorted(self._registry.values(), key=lambda r: r.name)

    def _cache(self, uid: int, weights: LoraWeights) -> None:
        self._cpu[uid] = weights
        self._cpu.move_to_end(uid)
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)

    def _weights(self, ref: LoraRef) -> LoraWeights:
        with self._lock:
            w = self._cpu.get(ref.uid)
            if w is not None:
                self._cpu.move_to_end(ref.uid)
                return w
        w = read_adapter(ref.path, self.mc, self.max_rank)  # evicted: read again from its path
        with self._lock:
            self._cache(ref.uid, w)
        return w

    # ---- one step (engine thread) ----------------------------------------------------------
    def begin_step(self, owners: Sequence[tuple[int, int, LoraRef | None]], num_tokens: int,
                   rows: list[int]) -> None:
        """Put this step's adapters in device slots and lay out their segments. `owners` are the token
        ranges of each scheduled sequence in flat-batch order; the scheduler keeps their distinct adapters
        within `max_loras`."""
        refs = {o[2].uid: o[2] for o in owners if o[2] is not None}
        if not refs:
            self.step = None
            return
        slots = self._activate(list(refs.values()))
        segments: list[tuple[int, int, int]] = []
        for s, e, ref in owners:
            if ref is None:
                continue
            slot = slots[ref.uid]
            if segments and segments[-1][1] == s and segments[-1][2] == slot:
                segments[-1] = (segments[-1][0], e, slot)
            else:
                segments.append((s, e, slot))
        self.step = LoraStep.build(segments, num_tokens, rows, self.device)

    def end_step(self) -> None:
        self.step = None

    def _activate(self, refs: list[LoraRef]) -> dict[int, int]:
        if len(refs) > self.max_loras:
            raise EngineError(f"a step needs {len(refs)} adapters but max_loras is {self.max_loras}")
        want = max(r.rank for r in refs)
        if want > self._rank_cap:
            self._grow(want)
        where = {uid: slot for slot, uid in enumerate(self._slot_uid) if uid is not None}
        pinned = {where[r.uid] for r in refs if r.uid in where}
        out: dict[int, int] = {}
        for ref in refs:
            slot = where.get(ref.uid)
            if slot is None:
                slot = next(s for s in self._slot_lru if s not in pinned)
                self._load(slot, ref)
                pinned.add(slot)
            self._slot_lru.move_to_end(slot)
            out[ref.uid] = slot
        return out

    def _grow(self, rank: int) -> None:
        """(Re)allocate the stacks for a larger rank; every slot is emptied and reloaded on its next use."""
        cap = min(self.max_rank, max(8, -(-rank // 8) * 8))
        mc = self.mc
        h, q, kv, i = mc.hidden_size, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim, mc.intermediate_size
        dims = {"qkv": (h, q + 2 * kv), "o_proj": (q, h), "gate_up": (h, 2 * i), "down_proj": (i, h)}
        n = self.max_loras
        self._stacks = {}
        for layer in range(mc.num_layers):
            for kind, (din, dout) in dims.items():
                r = cap * len(FUSED[kind])
                self._stacks[(layer, kind)] = (torch.zeros(n, din, r, dtype=self.dtype, device=self.device),
                                               torch.zeros(n, r, dout, dtype=self.dtype, device=self.device))
        self._rank_cap = cap
        self._slot_uid = [None] * n
        self._slot_saved = [{} for _ in range(n)]

    def _load(self, slot: int, ref: LoraRef) -> None:
        """Copy an adapter into a device slot: A transposed into its rank block, B into its block of the
        fused output (block-diagonal), zeros elsewhere."""
        w = self._weights(ref)
        cap, mc = self._rank_cap, self.mc
        q, kv, i = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim, mc.intermediate_size
        widths = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": mc.hidden_size, "gate_proj": i,
                  "up_proj": i, "down_proj": mc.hidden_size}
        for (layer, kind), (a_st, b_st) in self._stacks.items():
            a_st[slot].zero_()
            b_st[slot].zero_()
            off = 0
            for j, module in enumerate(FUSED[kind]):
                pair = w.pairs.get((layer, module))
                if pair is not None:
                    a, b = pair
                    r = a.shape[0]
                    a_st[slot, :, j * cap : j * cap + r] = a.T.to(self.dtype)
                    b_st[slot, j * cap : j * cap + r, off : off + widths[module]] = b.T.to(self.dtype)
                off += widths[module]
        self._slot_saved[slot] = {k: v.to(self.device, self.dtype) for k, v in w.saved.items()}
        self._slot_uid[slot] = ref.uid
        self.loads += 1

    def active(self) -> list[int]:
        """uids of the adapters now in device slots."""
        return [u for u in self._slot_uid if u is not None]


def enable(model: nn.Module, mc: ModelConfig, device: torch.device, dtype: torch.dtype, *, enable_lora: bool,
           adapters: dict[str, str], max_loras: int, max_cpu_loras: int, max_rank: int) -> AdapterManager | None:
    """The engine's adapter manager (its model wrapped, its declared adapters registered), or None when
    LoRA is off: the base model then runs exactly as without this module."""
    if not (enable_lora or adapters):
        return None
    mgr = AdapterManager(model, mc, device, dtype, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
                         max_rank=max_rank)
    for name, path in adapters.items():
        mgr.register(name, path)
    return mgr


def resolve(mgr: AdapterManager | None, lora: str | LoraRef | None) -> LoraRef | None:
    """A request's adapter by name; EngineError (404 model_not_found) for one that is not registered."""
    if lora is None or isinstance(lora, LoraRef):
        return lora
    ref = mgr.get(lora) if mgr is not None else None
    if ref is None:
        raise EngineError(f"the adapter {lora!r} is not loaded", "model_not_found", param="model")
    return ref
