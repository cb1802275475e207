"""A GGUF base is resolved once per command (model/gguf.py, model/loading.py ``resolve_path``): train,
merge and export gguf each hash the file's first MiBs once and say its line once, and a second
command in the same process says its own line (no per-process memory). The count is of calls to
``gguf.cache_key`` (the hash), the line is read from stdout; the adapter names the cached directory.
Conversion itself (logits, tokens, bad files): test_gguf_in.py.
"""

import json
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def pkg_gguf(tmp_path_factory, tiny_model_dir, gguf_models):
    """A q8_0 GGUF of a random tiny Llama (the tiny model's tokenizer), shipped in a package
    directory: (its site folder, the ``pkg:`` name)."""
    from philora.export.gguf import export_gguf
    d = tmp_path_factory.mktemp("gguf-resolve")
    base = gguf_models.tiny_llama(d / "llama", Path(tiny_model_dir))
    pkg = d / "site" / "fake_gguf_models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    export_gguf(str(base), pkg / "tiny.gguf", outtype="q8_0")
    return d / "site", "pkg:fake_gguf_models/tiny.gguf"


@pytest.fixture
def hashes(pkg_gguf, tmp_path, monkeypatch):
    """Calls to gguf.cache_key (each hashes the file's first MiBs), in a fresh cache, with the
    package importable."""
    from philora.model import gguf
    monkeypatch.syspath_prepend(str(pkg_gguf[0]))
    monkeypatch.setenv("PHILORA_CACHE", str(tmp_path / "cache"))
    calls, real = [], gguf.cache_key
    monkeypatch.setattr(gguf, "cache_key", lambda path: calls.append(path) or real(path))
    return calls


def command(capsys, calls, *argv):
    """Run ``philora *argv`` in this process: (the lines saying the GGUF file, hash calls)."""
    from philora.cli import main
    capsys.readouterr()
    calls.clear()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return [line for line in out.splitlines() if line.startswith("GGUF tiny.gguf:")], len(calls)


def test_train_merge_export_resolve_the_gguf_once_each(pkg_gguf, hashes, tmp_path, small_data, capsys, helpers):
    from philora.model.loading import resolve_path
    name = pkg_gguf[1]
    runs = [tmp_path / "run1", tmp_path / "run2"]
    said, n = command(capsys, hashes, "train", *helpers.make_args(runs[0], name, small_data))
    assert n == 1 and len(said) == 1 and "de-quantizing to float32 into" in said[0], said
    converted = said[0].split(" into ")[1].split(" (once")[0]
    said, n = command(capsys, hashes, "train", *helpers.make_args(runs[1], name, small_data))
    assert n == 1 and len(said) == 1 and said[0].endswith(f"de-quantized to float32 in {converted}"), said
    for run in runs:  # the adapter names the cached directory (what peft loads)
        assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == converted

    said, n = command(capsys, hashes, "merge", runs[0], "--out", tmp_path / "merged")
    assert n == 1 and len(said) == 1 and converted in said[0], said
    said, n = command(capsys, hashes, "export", "gguf", runs[0], "--out", tmp_path / "out" / "tuned.gguf",
                      "--outtype", "f32")
    assert n == 1 and len(said) == 1 and converted in said[0], said  # its merge gets the directory

    hashes.clear()  # a resolved directory resolves to itself: no hash, no line
    assert resolve_path(converted) == converted and not hashes and not capsys.readouterr().out
    shutil.rmtree(Path(converted))  # the next command converts again, and says so
    said, n = command(capsys, hashes, "merge", runs[1], "--out", tmp_path / "merged2")
    assert n == 1 and len(said) == 1 and "de-quantizing" in said[0], said
