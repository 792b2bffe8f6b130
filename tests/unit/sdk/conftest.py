"""Every SDK test runs with its own (empty) config folder and data folder, so neither a
developer's ``plinth login`` nor the checkout's local admin key is ever read or written."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_credentials_of_the_developer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("PLINTH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("PLINTH_API_KEY", raising=False)
