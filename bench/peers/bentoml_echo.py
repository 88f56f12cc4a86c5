"""BentoML serving the same echo as examples/echo (a sync API method), for bench/runtime.py."""

from typing import Any

import bentoml


@bentoml.service(workers=1)
class Echo:
    @bentoml.api
    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"echo": inputs}
