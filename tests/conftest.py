"""Shared fixtures: a private philora cache (never ~/.cache) and the built-in tiny model, built once.

Kept small and generic; test files define their own specialised fixtures.
"""

import os

import pytest


@pytest.fixture(scope="session")
def philora_cache(tmp_path_factory):
    """A session-wide PHILORA_CACHE directory (tests never write to ~/.cache/philora)."""
    return tmp_path_factory.mktemp("philora-cache")


@pytest.fixture(autouse=True)
def _private_philora_cache(philora_cache, monkeypatch):
    monkeypatch.setenv("PHILORA_CACHE", str(philora_cache))


@pytest.fixture(scope="session")
def tiny_model_dir(philora_cache):
    """The built-in tiny Phi-3 (real tokenizer and chat template), built once into the private
    cache, so ``model.name_or_path: tiny`` resolves to it without rebuilding."""
    from philora.tiny import resolve_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHILORA_CACHE", str(philora_cache))
        path = resolve_model("tiny")
    assert os.path.commonpath([path, str(philora_cache)]) == str(philora_cache)
    return path
