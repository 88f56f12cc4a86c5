"""REST routes for datasets (admin keys): `GET /api/v1/datasets`, `GET /api/v1/datasets/{name}`,
`GET /api/v1/datasets/{name}/export`, `POST /api/v1/datasets/{name}/import`, `DELETE /api/v1/datasets/{name}` and
`DELETE /api/v1/datasets/{name}/records/{request_id}` (one captured request)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from ballast.control.datasets import Datasets
from ballast.platform.auth import Actor
from ballast.platform.openapi import CheckedJSONRoute, errors

DATASET = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
Name = Annotated[str, PathParam(pattern=DATASET, max_length=63)]


class ImportRequest(BaseModel):
    jsonl: str = Field(max_length=32 * 2**20, description="OpenAI chat fine-tuning JSONL: one "
                       '{"messages": [...]} per line, the last message the assistant\'s.')


def router(datasets: Datasets) -> APIRouter:
    api = APIRouter(prefix="/api/v1", route_class=CheckedJSONRoute, tags=["datasets"])

    @api.get("/datasets")
    def list_datasets(_who: Actor) -> dict[str, Any]:
        """Datasets with their number of examples and of corrected ones."""
        return {"data": datasets.summary()}

    @api.get("/datasets/{name}", responses=errors(404))
    def show_dataset(name: Name, _who: Actor, limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
        """The first examples of a dataset (a correction shown as the completion)."""
        return datasets.show(name, limit)

    @api.get("/datasets/{name}/export", responses=errors(404))
    def export_dataset(name: Name, _who: Actor, held_out: Annotated[float, Query(ge=0, le=1)] = 0.0,
                       seed: Annotated[int, Query(ge=0, le=2**31)] = 0) -> dict[str, Any]:
        """Every example in the fine-tuning format, split into train and held-out by a seeded shuffle."""
        return datasets.export(name, held_out, seed)

    @api.post("/datasets/{name}/import", status_code=201, responses=errors(400))
    def import_dataset(name: Name, body: ImportRequest, _who: Actor) -> dict[str, Any]:
        """Add the examples of a JSONL file; one bad line (named in the error) imports nothing."""
        return datasets.import_jsonl(name, body.jsonl)

    @api.delete("/datasets/{name}", responses=errors(404))
    def delete_dataset(name: Name, _who: Actor) -> dict[str, Any]:
        """Delete every example of a dataset."""
        return datasets.delete(name)

    @api.delete("/datasets/{name}/records/{request_id}", responses=errors(404))
    def delete_record(name: Name, request_id: Annotated[str, PathParam(max_length=64)], _who: Actor) -> dict[str, Any]:
        """Delete one captured request (and its feedback)."""
        return datasets.delete(name, request_id)

    return api
