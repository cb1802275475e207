"""What happens to a run directory around faults: --resume with changed settings, --overwrite that
cannot start, leftovers of a killed save, the final eval after a kill, and the remaining
one-line errors (output_dir a file, a bad target_modules regex, a YAML list, --top-p 90).
"""

import shutil

import pytest
import yaml

from philora.run import train as train_mod
from philora.run.checkpoint import list_checkpoints
from philora.core.config import ConfigError, load_config
from philora.core.diskio import TEMP_PREFIX
from philora.core.errors import PhiloraError
from philora.run.metrics import read_metrics
from philora.run.train import train

RUN = ["training_config.save_steps=2", "training_config.save_total_limit=0"]  # 4 steps: checkpoints 2 and 4


@pytest.fixture(scope="module")
def finished(small_model_dir, small_data, tmp_path_factory, helpers, philora_cache):
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHILORA_CACHE", str(philora_cache))
        train(helpers.make_cfg(out, small_model_dir, small_data, *RUN))
    return out


def copy_of(finished, tmp_path, drop_adapter=True):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    if drop_adapter:  # as if killed after the last checkpoint, before the adapter
        for p in ("adapter_model.safetensors", "adapter_config.json"):
            (out / p).unlink()
    return out


def snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_resume_with_changed_training_settings_is_refused_with_the_list(finished, tmp_path, small_model_dir,
                                                                        small_data, helpers):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    cfg = helpers.make_cfg(out, small_model_dir, small_data, *RUN, "training_config.learning_rate=1e-3",
                           "peft_config.r=2", "training_config.logging_steps=2")  # the last may change
    with pytest.raises(PhiloraError) as e:
        train(cfg, resume=True)
    msg = helpers.one_line_error(e, str(out / "checkpoint-4"), "training_config.learning_rate 0.005 -> 0.001",
                                 "peft_config.r 4 -> 2")
    assert "logging_steps" not in msg
    assert snapshot(out) == before  # nothing written, config.yaml included


def test_resume_may_change_the_length_and_logging_and_says_so(finished, tmp_path, small_model_dir, small_data,
                                                              helpers, capsys):
    out = copy_of(finished, tmp_path)
    train(helpers.make_cfg(out, small_model_dir, small_data, *RUN, "training_config.max_steps=6",
                           "training_config.logging_steps=2"), resume=True)
    printed = capsys.readouterr().out
    assert "--resume: applied training_config.max_steps 4 -> 6" in printed
    text = (out / "config.yaml").read_text()
    assert text.startswith("# resumed from checkpoint-4, trained until then with training_config.max_steps: 4\n")
    used = load_config(out / "config.yaml")  # config.yaml states what the run now uses
    assert used.training_config.max_steps == 6 and used.training_config.logging_steps == 2
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 6]


def test_a_kill_before_the_adapter_logs_the_final_eval_once(finished, tmp_path, small_model_dir, small_data, helpers):
    out = copy_of(finished, tmp_path)
    train(helpers.make_cfg(out, small_model_dir, small_data, *RUN), resume=True)
    assert [r["step"] for r in read_metrics(out) if "eval_loss" in r] == [0, 4]
    assert helpers.timeless_records(out) == helpers.timeless_records(finished)
    for k, v in helpers.adapter_tensors(finished).items():
        assert (helpers.adapter_tensors(out)[k] == v).all()


def test_leftovers_of_a_killed_save_are_cleaned_and_a_half_replaced_checkpoint_restored(
        finished, tmp_path, small_model_dir, small_data, helpers, capsys):
    out = copy_of(finished, tmp_path)
    (out / "checkpoint-4").rename(out / ".old-checkpoint-4")  # killed while re-saving step 4
    (out / ".checkpoint-6.x1y2").mkdir()
    (out / ".checkpoint-6.x1y2" / "lora.safetensors").write_bytes(b"half")
    (out / f"{TEMP_PREFIX}config.yaml.abc").write_text("half")
    (out / f"{TEMP_PREFIX}stage.def").mkdir()
    train(helpers.make_cfg(out, small_model_dir, small_data, *RUN), resume=True)
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in printed
    assert "removed what an interrupted save left" in printed and ".checkpoint-6.x1y2" in printed
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("mistake, needle", [
    ("data.train=/no/such/file.jsonl", "file.jsonl"),  # fails while the data loads
    ("peft_config.target_modules=[no_such_proj]", "no_such_proj"),  # fails after the model has loaded
])
def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(finished, tmp_path, small_model_dir,
                                                                   small_data, helpers, mistake, needle):
    out = copy_of(finished, tmp_path, drop_adapter=False)
    before = snapshot(out)
    with pytest.raises(PhiloraError) as e:
        train(helpers.make_cfg(out, small_model_dir, small_data, mistake), overwrite=True)
    helpers.one_line_error(e, needle)
    assert snapshot(out) == before


def test_output_dir_that_is_a_file_fails_before_anything_loads(tmp_path, small_model_dir, small_data, helpers,
                                                               monkeypatch):
    (tmp_path / "taken").write_text("not a directory")
    monkeypatch.setattr(train_mod, "load_tokenizer", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(PhiloraError) as e:
        train(helpers.make_cfg(tmp_path / "taken", small_model_dir, small_data))
    helpers.one_line_error(e, str(tmp_path / "taken"), "not a directory")


def test_config_mistakes_are_one_line(tmp_path, helpers):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["peft_config.target_modules=.*(q_proj"])
    helpers.one_line_error(e, "peft_config.target_modules", "regular expression")
    p = tmp_path / "list.yaml"
    p.write_text(yaml.safe_dump([{"model": {"name_or_path": "tiny"}}]))
    for overrides in ([], ["training_config.max_steps=3"]):
        with pytest.raises(ConfigError) as e:
            load_config(p, overrides)
        helpers.one_line_error(e, str(p), "mapping", "list")


@pytest.mark.parametrize("argv", [["--top-p", "90"], ["--top-p", "0"], ["--temperature", "-1"],
                                  ["--max-new-tokens", "0"]])
def test_numeric_cli_options_are_range_checked(argv, capsys):
    from philora.cli import main
    with pytest.raises(SystemExit) as e:
        main(["generate", "some-run", "--prompt", "hi", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and argv[0] in err.strip().splitlines()[-1]
