"""The `capture:` section: off unless present, and a redact pattern that is not a regular expression is an error
at load time (not a capture that silently stores what it should have hidden)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ballast.config import BallastConfig


def test_capture_is_off_by_default() -> None:
    assert BallastConfig(name="chat").capture is None


def test_capture_section_is_checked() -> None:
    cfg = BallastConfig.model_validate({"name": "chat", "capture": {"dataset": "notes", "redact": [r"\d+"]}})
    assert cfg.capture is not None and cfg.capture.sample_rate == 1.0 and cfg.capture.retention_days == 30
    for bad in ({"dataset": "notes", "redact": ["(unclosed"]}, {"dataset": "notes", "sample_rate": 1.5},
                {"dataset": "../x"}, {"dataset": "notes", "retention_days": 0}, {"redact": []}):
        with pytest.raises(ValidationError):
            BallastConfig.model_validate({"name": "chat", "capture": bad})
