"""The philora command: help, one-line errors with exit status 2, override-only invocations."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from philora.cli import main
from philora.core.config import load_config
from philora.run.metrics import read_metrics


def one_error_line(capsys, *needles, bars=False):
    """stderr is one line, 'philora: error: ...'; with ``bars``, transformers' progress bars
    (model loading) may come before it."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if bars:
        lines = [line for line in lines if "it/s]" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("philora: error: ") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "merge", "generate", "chat", "eval", "adapter"):
        assert command in out
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "--overwrite" in out and "overrides" in out


def test_bad_config_file_exits_2_with_one_line(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("training_config:\n  lerning_rate: 0.1\n")
    assert main(["train", str(p)]) == 2
    one_error_line(capsys, str(p), "'training_config.lerning_rate'")


@pytest.mark.parametrize("args, needles", [
    (["train", "training_config.max_steps=abc"], ["'training_config.max_steps'", "abc"]),
    (["train", "training_config.max_steps=2", "peft_config.rank=3"], ["'peft_config.rank'"]),
    (["train", "no-such-config.yaml"], ["no-such-config.yaml"]),
    (["train", "model.dtype=fp8"], ["'model.dtype'"]),
])
def test_bad_invocations_exit_2(args, needles, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    one_error_line(capsys, *needles)
    assert not list(tmp_path.iterdir())  # nothing was written


def test_as_a_process(tmp_path):
    """The real exit status and stderr of ``python -m philora``."""
    p = tmp_path / "bad.yaml"
    p.write_text("peft_config: {r: many}\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "philora", "train", str(p)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "'peft_config.r'" in res.stderr
    assert res.stderr.startswith("philora: error: ")
    res = subprocess.run([sys.executable, "-m", "philora", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "train" in res.stdout


@pytest.fixture
def small_args(tmp_path):
    """Overrides for a fast run on a very small model (see test_train.small_model_dir)."""
    def make(small_model_dir, small_data, out):
        train_file, eval_file = small_data
        return [f"model.name_or_path={small_model_dir}", f"data.train={train_file}", f"data.eval={eval_file}",
                f"training_config.output_dir={out}", "data.max_length=128", "training_config.report_samples=0",
                "training_config.progress_bar=false", "training_config.per_device_train_batch_size=4",
                "training_config.save_steps=1", "training_config.eval_steps=0"]
    return make


def test_override_only_invocation_trains(tmp_path, small_args, small_model_dir, small_data, capsys):
    out = tmp_path / "run"
    args = ["train", "training_config.max_steps=2"] + small_args(small_model_dir, small_data, out)
    assert main(args) == 0
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    cfg = load_config(out / "config.yaml")
    builtin = load_config()
    assert cfg.training_config.max_steps == 2
    # everything not overridden comes from the built-in default (tiny.yaml)
    assert cfg.training_config.learning_rate == builtin.training_config.learning_rate
    assert cfg.peft_config == builtin.peft_config
    assert [r["step"] for r in read_metrics(out) if "eval_loss" in r] == [0, 2]
    capsys.readouterr()

    # the same again: the run is in the way
    assert main(args) == 2
    one_error_line(capsys, str(out), "--overwrite")
    assert (out / "adapter_model.safetensors").exists()
    # --resume from its last checkpoint (step 2 of 3), --overwrite from scratch
    assert main(["train", "training_config.max_steps=3", "--resume"] + args[2:]) == 0
    assert [r["step"] for r in read_metrics(out) if "loss" in r][-1] == 3
    assert main(args + ["--overwrite"]) == 0
    assert [r["step"] for r in read_metrics(out) if "loss" in r][-1] == 2


def test_config_file_plus_overrides(tmp_path, small_args, small_model_dir, small_data):
    p = tmp_path / "run.yaml"
    p.write_text("training_config:\n  max_steps: 5\n  learning_rate: 1.0e-3\npeft_config:\n  r: 2\n")
    out = tmp_path / "run"
    assert main(["train", str(p), "training_config.max_steps=1"] + small_args(small_model_dir, small_data, out)) == 0
    cfg = load_config(out / "config.yaml")
    assert cfg.training_config.max_steps == 1 and cfg.peft_config.r == 2
    assert cfg.training_config.learning_rate == pytest.approx(1e-3)


def test_data_and_target_errors_exit_2(tmp_path, small_args, small_model_dir, small_data, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(small_data[0]).read_text().splitlines()[0] + "\n{not json\n")
    args = small_args(small_model_dir, small_data, tmp_path / "run") + [f"data.train={bad}", "training_config.max_steps=1"]
    assert main(["train"] + args) == 2
    one_error_line(capsys, f"{bad}:2")  # found before the model is loaded: no loading bar either
    args = small_args(small_model_dir, small_data, tmp_path / "run2")
    assert main(["train", "training_config.max_steps=1", "peft_config.target_modules=[q_projj]"] + args) == 2
    one_error_line(capsys, "'q_projj'", bars=True)


def test_overrides_after_options(tmp_path, small_args, small_model_dir, small_data, monkeypatch):
    """`philora train run.yaml --overwrite key=value`: overrides after an option still count."""
    seen = {}
    import philora.use.report
    import philora.run.train
    monkeypatch.setattr(philora.run.train, "train", lambda cfg, resume, overwrite: seen.update(
        cfg=cfg, resume=resume, overwrite=overwrite))
    monkeypatch.setattr(philora.use.report, "end_of_run", lambda result, cfg: None)
    p = tmp_path / "run.yaml"
    p.write_text("training_config:\n  max_steps: 5\n")
    assert main(["train", str(p), "peft_config.r=2", "--overwrite", "training_config.max_steps=7", "--resume",
                 "peft_config.lora_alpha=3"]) == 0
    cfg = seen["cfg"]
    assert (cfg.peft_config.r, cfg.training_config.max_steps, cfg.peft_config.lora_alpha) == (2, 7, 3.0)
    assert seen["resume"] and seen["overwrite"]
    assert main(["train", "--overwrite", "training_config.max_steps=9"]) == 0
    assert seen["cfg"].training_config.max_steps == 9 and seen["cfg"].model.name_or_path == "tiny"
    with pytest.raises(SystemExit) as e:
        main(["train", str(p), "--overwrite", "stray"])
    assert e.value.code == 2



def test_enable_lora_flag_parses_and_rejects(capsys, monkeypatch):
    from philora.export import adapter_convert
    from philora.cli import _enable_lora

    assert _enable_lora(["qkv_proj=1,0,1", "gate_up_proj=true,false"]) == {
        "qkv_proj": [True, False, True], "gate_up_proj": [True, False]}
    assert _enable_lora([]) is None
    seen = {}
    monkeypatch.setattr(adapter_convert, "convert", lambda *a, **k: seen.update(k))
    assert main(["adapter", "convert", "x.pt", "--out", "y", "--to", "peft", "--enable-lora", "qkv_proj=1,0,1"]) == 0
    assert seen["enable_lora"] == {"qkv_proj": [True, False, True]}
    assert main(["adapter", "convert", "x.pt", "--out", "y", "--to", "peft", "--enable-lora", "qkv_proj=yes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("philora: error: --enable-lora 'qkv_proj=yes'")


def test_generate_out_needs_force(tmp_path, capsys, monkeypatch):
    from philora.use import generate

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    out = tmp_path / "o.jsonl"
    out.write_text("keep me\n")
    assert main(["generate", "tiny", "--prompts", str(prompts), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"
    monkeypatch.setattr(generate, "load_source", lambda *a, **k: (None, None, None))
    monkeypatch.setattr(generate, "generate_reply", lambda *a, **k: "ok")
    assert main(["generate", "tiny", "--prompts", str(prompts), "--out", str(out), "--force"]) == 0
    assert '"response": "ok"' in out.read_text()
    # a directory where a file is wanted: refused before any work, --force or not
    assert main(["generate", "tiny", "--prompts", str(prompts), "--out", str(tmp_path), "--force"]) == 2
    assert capsys.readouterr().err.strip() == f"philora: error: --out '{tmp_path}' is a directory; give a file name"
    # prompts are read as training data is: a BOM is dropped, bad bytes are a line-numbered error
    prompts.write_bytes(b'\xef\xbb\xbf{"prompt": "hi"}\n\n{"prompt": "caf\xe9"}\n')
    assert main(["generate", "tiny", "--prompts", str(prompts), "--out", str(out), "--force"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"philora: error: {prompts}:3: not UTF-8 text")


def test_bench_options_pass_through(tmp_path, monkeypatch, capsys):
    """`philora bench ARGS` runs bench/run.py's main(ARGS) from the source checkout."""
    from philora import cli

    assert cli.BENCH.is_file()  # this checkout's bench/run.py
    fake = tmp_path / "run.py"
    fake.write_text("import json, sys\ndef main(argv):\n    print(json.dumps(argv))\n    return 3\n")
    monkeypatch.setattr(cli, "BENCH", fake)
    assert main(["bench", "--systems", "philora", "--", "--steps", "3"]) == 3
    assert capsys.readouterr().out.strip() == '["--systems", "philora", "--steps", "3"]'
    monkeypatch.setattr(cli, "BENCH", tmp_path / "bench" / "run.py")  # an installed package: no bench/
    assert main(["bench"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "source checkout" in err[0]
