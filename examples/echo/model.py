"""Echo: a sync model that returns what it receives."""

from typing import Any


class Model:
    def predict(self, inputs: Any) -> Any:
        return {"echo": inputs}
