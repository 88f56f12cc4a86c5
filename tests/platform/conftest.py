from __future__ import annotations

import pytest

from tests.store.databases import database_url_fixture


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    yield from database_url_fixture(request, tmp_path)
