"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

from hub_server import OlahServer, olah_unavailable_reason, start_olah, stop_olah


@pytest.fixture(scope="session")
def olah_server(tmp_path_factory: pytest.TempPathFactory) -> OlahServer:
    """A Hub endpoint on 127.0.0.1 (olah serving local git repos), started once per session and stopped by pid."""
    reason = olah_unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = start_olah(tmp_path_factory.mktemp("olah"))
    try:
        yield server
    finally:
        stop_olah(server)
