from __future__ import annotations

import pytest_twisted
import treq

from pothead.demo import app
from pothead.testing import running_pair


@pytest_twisted.ensureDeferred
async def test_request_goes_through() -> None:
    async with running_pair(app, threads=2) as pair:
        response = await treq.get(pair.url("/hello?x=1"), persistent=False)
        body = await response.content()
        assert response.code == 200
        assert b"Hello from pothead worker" in body
        assert response.headers.getRawHeaders(b"x-request-id")
