"""Shared fixtures: a per-session data cache so the BPE and token streams are built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data cache shared by the tests of one session (``THRIFTY_TEST_DATA`` reuses one across sessions)."""
    env = os.environ.get("THRIFTY_TEST_DATA")
    path = Path(env) if env else tmp_path_factory.mktemp("thrifty-data")
    path.mkdir(parents=True, exist_ok=True)
    return path
