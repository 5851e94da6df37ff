"""Shared fixtures for the editing-core tests."""

from __future__ import annotations

import pytest

from workers.editing.model import LoadedModel, load_model


@pytest.fixture(scope="session")
def loaded_model() -> LoadedModel:
    """The bundled SmolLM2, loaded once per session; tests must leave its weights unchanged."""
    return load_model()
