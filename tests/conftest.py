"""Shared pytest configuration.

Every async test runs on asyncio, asyncio + uvloop and trio, through anyio's
own pytest plugin (it ships inside the ``anyio`` package; the PyPI package named
``pytest-anyio`` is an unrelated empty placeholder).  Mark a test module with
``pytestmark = pytest.mark.anyio`` (or a test with ``@pytest.mark.anyio``) and it
is run once per backend below.
"""

from __future__ import annotations

from typing import Any

import pytest

BACKENDS: list[tuple[str, dict[str, Any]]] = [
    ("asyncio", {}),
    ("asyncio", {"use_uvloop": True}),
    ("trio", {}),
]


@pytest.fixture(
    params=[pytest.param(b, id=b[0] + ("+uvloop" if b[1] else "")) for b in BACKENDS],
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Run each anyio-marked test on asyncio, asyncio+uvloop and trio."""
    backend: tuple[str, dict[str, Any]] = request.param
    return backend
