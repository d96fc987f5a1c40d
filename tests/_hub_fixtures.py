"""The `hub` and `no_backoff` fixtures for card and publish tests: a local Hub server with
huggingface_hub pointed at it, and retries without waiting. Fabricated builds come from
quantkit.testing.fabricate."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from quantkit.testing.hub_server import HubServer, use_hub


@pytest.fixture
def hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A fresh local Hub; huggingface_hub pointed at it (plain LFS, its token, temp HF_HOME)."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with HubServer() as server, use_hub(server, home=str(home)):
        yield server


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Retries without waiting: huggingface_hub's http_backoff and publish's commit retry.
    Returns the waits publish asked for."""
    import types

    import huggingface_hub.utils._http as hf_http

    from quantkit import publish

    waits: list[float] = []
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=lambda s: None))
    monkeypatch.setattr(publish, "_sleep", waits.append)
    return waits
