"""Request bodies of the REST API, as strict as the control plane: what the OpenAPI document accepts is
what the server accepts (names, environments, scopes, periods and limits are checked before any work)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"  # deployment and environment names (ballast.control)
INT32 = 2**31 - 1
INT53 = 2**53  # the largest integer every JSON client reads exactly
SERVER_PATH = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$",
                    description="A package directory on the platform's machine; accepted from loopback clients "
                                "only (others upload the package).")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error: OpenAI's shape."""

    error: ErrorDetail


class DeployRequest(BaseModel):
    path: str = SERVER_PATH
    name: str | None = Field(None, pattern=NAME, description="Deployment name; the package's name by default.")
    env: str | None = Field(None, pattern=NAME, description="Promote the new version to this environment.")
    pools: list[str] | None = Field(None, max_length=16, description="Pin the version's replicas to these pools, "
                                    "in order of preference (over placement.pools of its ballast.yaml).")


class PromoteRequest(BaseModel):
    version: int = Field(ge=1, le=INT32)
    env: str = Field("production", pattern=NAME)
    canary: int | None = Field(None, ge=1, le=99, description="Percent of traffic for the new version first.")
    ramp_s: float = Field(0.0, ge=0, le=1e9, description="Shift the rest stepwise over this many seconds "
                                                          "(0: stay at canary).")


class RollbackRequest(BaseModel):
    env: str = Field("production", pattern=NAME)
    version: int | None = Field(None, ge=1, le=INT32)


class ScaleRequest(BaseModel):
    env: str = Field("production", pattern=NAME)
    min: int | None = Field(None, ge=0, le=INT32)
    max: int | None = Field(None, ge=1, le=INT32)


class KeyRequest(BaseModel):
    name: str = Field("", max_length=128, description="A label for people (who or what uses the key).")
    scopes: list[Literal["inference", "metrics", "admin", "capture", "fine_tune"]] = Field(["inference"], min_length=1)
    deployments: list[str] | None = Field(None, description="Deployments the key may use (default: all).")
    rpm: int | None = Field(None, ge=1, le=INT32, description="Requests per minute (token bucket).")
    tpm: int | None = Field(None, ge=1, le=INT32, description="Prompt + completion tokens per minute.")
    token_budget: int | None = Field(None, ge=1, le=INT53, description="Tokens per period; over it, 429.")
    per: Literal["day", "month"] = Field("month", description="Budget period (UTC).")


class DevRequest(BaseModel):
    path: str = SERVER_PATH
    name: str | None = Field(None, pattern=NAME)
