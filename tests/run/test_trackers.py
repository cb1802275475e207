"""training_config.report_to: what each tracker's own store holds after a run (MLflow's sqlite store,
W&B offline files, trackio's database), a resumed run continuing its MLflow run, a missing package
(one line, before anything loads), a tracker failing mid-run (a warning, the run goes on)."""

import glob
import importlib.metadata
import json
import re
import sqlite3
import sys
from pathlib import Path

import pytest

from philora.run import trackers
from philora.core.config import ConfigError, load_config
from philora.core.errors import PhiloraError
from philora.run.metrics import read_metrics
from philora.run.trackers import Trackers, report_to_names
from philora.run.train import train

RECORD = {"step": 3, "loss": 2.5, "lr": 1e-3, "elapsed": 1.0}
GENERATIONS = {"step": 4, "generations": [{"prompt": [{"role": "user", "content": "hi"}], "reference": "yo",
                                           "output": "hey there"}]}
CONFIG = {"training_config": {"learning_rate": 1e-3, "report_to": ["mlflow"]}, "peft_config": {"r": 4}}


@pytest.fixture
def no_mlflow_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One MLflow store for the tests that set MLFLOW_TRACKING_URI (a new store takes seconds to set up)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def mlflow_runs(uri, run_id=None):
    """(client, [runs]): every run of the philora experiment, or the one with ``run_id``."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    if run_id:
        return client, [client.get_run(run_id)]
    experiment = client.get_experiment_by_name("philora")
    return client, client.search_runs([experiment.experiment_id])


def run_id(out, name="mlflow"):
    return json.loads((out / "trackers.json").read_text())[name]


def history(client, run, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def test_report_to_values():
    assert report_to_names("none") == [] and report_to_names(["tensorboard", "mlflow"]) == ["tensorboard", "mlflow"]
    assert "tensorboard" in report_to_names("all")
    assert load_config(None, ["training_config.report_to=wandb"]).training_config.report_to == "wandb"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["training_config.report_to=[tensorboard,comet]"])
    assert "training_config.report_to" in str(e.value) and "\n" not in str(e.value)


def test_mlflow_store_holds_the_run(tmp_path, small_model_dir, small_data, no_mlflow_env, helpers):
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    train(helpers.make_cfg(out, small_model_dir, small_data, "training_config.report_to=[mlflow]",
                           "training_config.eval_steps=2", "training_config.eval_generations=1"))
    assert not (out / "tensorboard").exists()  # not asked for
    client, (run,) = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}")  # the default store, inside the run
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    records = read_metrics(out)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "eval_perplexity"):
        want = [(r["step"], r[key]) for r in records if key in r]
        got = history(client, run, key)
        assert [s for s, _ in got] == [s for s, _ in want] and len(want) >= 2, key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-9), key
    params = run.data.params
    assert params["training_config.learning_rate"] == "0.005" and params["peft_config.r"] == "4"
    assert params["training_config.report_to"] == '["mlflow"]'
    files = sorted(a.path for a in client.list_artifacts(run.info.run_id, "generations"))
    assert files == [f"generations/step-{s:07d}.md" for s in (0, 2, 4)]
    text = Path(client.download_artifacts(run.info.run_id, files[-1], str(tmp_path))).read_text()
    last = [r for r in records if "generations" in r][-1]["generations"][0]["output"]
    assert last.split("\n")[0] in text


def test_mlflow_tracking_uri_is_honoured(tmp_path, monkeypatch, shared_store):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_store)
    with Trackers(tmp_path / "run", ["mlflow"], CONFIG, resume=False) as t:
        t.log(RECORD)
    assert not (tmp_path / "run" / "mlflow.db").exists()
    client, (run,) = mlflow_runs(shared_store, run_id(tmp_path / "run"))
    assert history(client, run, "loss") == [(3, 2.5)] and run.info.status == "FINISHED"


def test_resumed_run_continues_its_mlflow_run(tmp_path, small_model_dir, small_data, recorder, monkeypatch,
                                             shared_store, helpers):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_store)
    out = tmp_path / "run"
    args = ["training_config.report_to=[mlflow]", "training_config.save_steps=2"]
    recorder.kill_at = 3  # killed during step 3, after checkpoint-2
    with pytest.raises(helpers.Killed):
        train(helpers.make_cfg(out, small_model_dir, small_data, *args))
    _, (run,) = mlflow_runs(shared_store, run_id(out))
    assert run.info.status == "FAILED"
    recorder.kill_at = None
    train(helpers.make_cfg(out, small_model_dir, small_data, *args), resume=True)
    client, (again,) = mlflow_runs(shared_store, run_id(out))
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [s for s, _ in history(client, again, "loss")] == [1, 2, 3, 4]  # each step once


def test_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with Trackers(tmp_path / "run", ["wandb"], CONFIG, resume=False) as t:
        t.log(RECORD)
        t.log(GENERATIONS)
    wandb.teardown()  # its service process writes the file; at the latest when the process exits
    (log,) = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(log).read_bytes()  # wandb's own record file: keys and JSON values as written
    assert b"loss" in data and b"2.5" in data and b"learning_rate" in data
    (table,) = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "files" / "media" / "table" / "*.json"))
    assert json.loads(Path(table).read_text())["data"] == [[4, "hi", "yo", "hey there"]]


def test_trackio(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    trackio = pytest.importorskip("trackio")
    with Trackers(tmp_path / "run", ["trackio"], CONFIG, resume=False) as t:
        t.log(RECORD)
    db = Path(trackio.utils.TRACKIO_DIR) / "philora.db"
    rows = sqlite3.connect(db).execute("select step, metrics from metrics").fetchall()
    assert (3, json.dumps({"loss": 2.5, "lr": 1e-3, "elapsed": 1.0}, separators=(",", ":")).encode()) in \
        [(s, bytes(m)) for s, m in rows]


def test_missing_package_is_one_line_before_anything_loads(tmp_path, monkeypatch, helpers):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config(None, [f"training_config.output_dir={tmp_path}", "data.train=/no/such/file.jsonl",
                             "training_config.report_to=[tensorboard,wandb]"])
    with pytest.raises(PhiloraError) as e:
        train(cfg)
    helpers.one_line_error(e, "training_config.report_to", "'wandb'", "pip install 'philora[wandb]'")


def test_each_hint_names_an_extra_that_installs_the_package(helpers):
    """pyproject.toml has the extra each missing-package hint names, the extra holds the distribution that
    provides the imported module (as installed here), and the README gives the same commands."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pytest's own dependency before 3.11
        import tomli as tomllib
    root = helpers.ROOT
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    readme = (root / "README.md").read_text()
    providers = importlib.metadata.packages_distributions()
    for name, (module, hint) in trackers.PACKAGES.items():
        wanted = project["dependencies"] if name == "tensorboard" else project["optional-dependencies"][name]
        if name != "tensorboard":
            assert hint == f"pip install 'philora[{name}]'" and f"`{hint}`" in readme, name
        names = {re.split(r"[<>=!~\[;, ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in wanted}
        assert {d.lower().replace("_", "-") for d in providers[module]} & names, (name, providers[module])


def test_a_failing_tracker_is_a_warning(tmp_path, small_model_dir, small_data, monkeypatch, capsys, helpers):
    class Flaky:
        def __init__(self, out, config, run_id):
            self.run_id, self.calls = "x", 0

        def log(self, record):
            self.calls += 1
            if self.calls == 2:
                raise ConnectionError("server went away\nsecond line")

        def finish(self, ok):
            raise AssertionError("dropped trackers are not finished")
    monkeypatch.setitem(trackers.CLASSES, "mlflow", Flaky)
    monkeypatch.setitem(trackers.PACKAGES, "mlflow", ("json", "-"))  # the fake needs no mlflow package
    out = tmp_path / "run"
    train(helpers.make_cfg(out, small_model_dir, small_data, "training_config.report_to=[tensorboard,mlflow]"))
    err = [line for line in capsys.readouterr().err.splitlines() if "report_to mlflow" in line]
    assert err == ["philora: warning: report_to mlflow: ConnectionError: server went away; no longer reporting "
                   "to mlflow (metrics.jsonl has everything)"]
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]
    assert (out / "adapter_model.safetensors").exists() and (out / "tensorboard").is_dir()
