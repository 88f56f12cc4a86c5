"""OpenAI API wire formats: error bodies, SSE framing and request/response schemas."""

from ballast.openai.errors import APIError, error_body, error_type_for_status
from ballast.openai.sse import DONE, sse_event

__all__ = ["DONE", "APIError", "error_body", "error_type_for_status", "sse_event"]
