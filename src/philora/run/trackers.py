"""Experiment trackers: ``training_config.report_to`` (tensorboard, mlflow, wandb, trackio).

Names and values as transformers' ``report_to`` (a name, a list, ``none`` or ``all``: every one
installed). TensorBoard is metrics.py's own writer; the others get, through :class:`Trackers`,
every record ``metrics.jsonl`` gets (losses, lr, grad norm, tokens/s, eval metrics; the eval
generations as a table or text) at its step, and the resolved config as parameters. Only rank 0
reports. A tracker that fails in the middle of a run is dropped with one warning line: a run is
never lost to its dashboard.

* MLflow: the store is ``$MLFLOW_TRACKING_URI``, else ``sqlite:///OUTPUT_DIR/mlflow.db`` with
  artifacts in ``OUTPUT_DIR/mlartifacts`` (current MLflow refuses its old ``./mlruns`` file
  store by default); experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``philora``.
* W&B: project ``$WANDB_PROJECT`` or ``philora``, files under ``OUTPUT_DIR/wandb``;
  ``WANDB_MODE=offline`` keeps it on disk (``wandb sync`` uploads it later).
* trackio: project ``$TRACKIO_PROJECT`` or ``philora``, stored where trackio keeps its runs
  (``$TRACKIO_DIR``).

Each is an optional extra of pyproject.toml (``pip install 'philora[mlflow]'``, ``[wandb]``,
``[trackio]``; mlflow's is the client and its sqlite store, mlflow-skinny + sqlalchemy + alembic);
``scripts/setup.sh --tests`` installs all three. A missing one is a one-line error naming its extra
before training starts (:func:`check_trackers`). A resumed run continues the same tracker run
(ids kept in ``OUTPUT_DIR/trackers.json``). Hand-written glue, a few calls per tracker:
transformers' integrations are Trainer callbacks, and philora has its own loop.
"""

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..core.errors import PhiloraError, first_line

# report_to name -> (module to import, what to install)
PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install 'philora[mlflow]'"),
    "wandb": ("wandb", "pip install 'philora[wandb]'"),
    "trackio": ("trackio", "pip install 'philora[trackio]'"),
}
IDS_FILE = "trackers.json"


def _installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name][0]) is not None


def report_to_names(report_to: Union[str, List[str]]) -> List[str]:
    """The trackers ``report_to`` asks for, in order: ``none`` is none, ``all`` every one installed."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "all" in names:
        return [n for n in PACKAGES if _installed(n)]
    return list(dict.fromkeys(n for n in names if n != "none"))


def check_trackers(report_to: Union[str, List[str]]) -> List[str]:
    """The tracker names, or a one-line PhiloraError naming a tracker whose package is missing."""
    names = report_to_names(report_to)
    for n in names:
        if n in PACKAGES and not _installed(n):
            raise PhiloraError(f"training_config.report_to: '{n}' needs the {PACKAGES[n][0]} package, "
                               f"which is not installed: {PACKAGES[n][1]} (or remove '{n}' from report_to)")
    return names


def flat_params(config: Dict[str, Any], prefix: str = "") -> Dict[str, str]:
    """{"section.key": value as text} of a nested config dict."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v and prefix == "":
            out.update(flat_params(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


def numbers(record: dict) -> Dict[str, float]:
    """The finite numeric values of a metrics record, ``step`` aside."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def last_user(prompt: List[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def generations_markdown(generations: List[dict]) -> str:
    """A markdown table of one evaluation's generations (TensorBoard text, MLflow artifact)."""
    def cell(text: str) -> str:
        return (text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")) or "*(empty)*"
    lines = ["| # | prompt (last user turn) | reference | output |", "|---|---|---|---|"]
    lines += [f"| {i} | {cell(last_user(g['prompt']))} | {cell(g['reference'])} | {cell(g['output'])} |"
              for i, g in enumerate(generations, 1)]
    return "\n".join(lines)


def _rows(record: dict) -> List[list]:
    return [[record["step"], last_user(g["prompt"]), g["reference"], g["output"]] for g in record["generations"]]


COLUMNS = ["step", "prompt", "reference", "output"]


# -----------------------------------------------------------------------------
# one class per tracker: log(record), finish(ok)

class MLflow:
    def __init__(self, out: Path, config: dict, run_id: Optional[str]):
        from mlflow import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "philora")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # artifacts beside the default store; a server decides for itself
            where = None if os.environ.get("MLFLOW_TRACKING_URI") else (out / "mlartifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=where)
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
        else:
            from mlflow.entities import Param
            run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
            params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 per call
                self.client.log_batch(run_id, params=params[i:i + 100])
        self.run_id = run_id
        self.uri = uri

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 (MlflowException: not in this store)
            return False

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, record["step"]) for k, v in numbers(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        if "generations" in record:
            self.client.log_text(self.run_id, generations_markdown(record["generations"]),
                                 f"generations/step-{record['step']:07d}.md")

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class WandB:
    def __init__(self, out: Path, config: dict, run_id: Optional[str]):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "philora"), name=out.name,
                              dir=str(out), config=config, id=run_id,
                              resume="allow" if run_id else None)
        self.run_id = self.run.id

    def log(self, record: dict) -> None:
        data: Dict[str, Any] = dict(numbers(record))
        if "generations" in record:
            data["generations"] = self.wandb.Table(columns=COLUMNS, data=_rows(record))
        if data:
            self.run.log(data, step=record["step"])

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class Trackio:
    def __init__(self, out: Path, config: dict, run_id: Optional[str]):
        import trackio

        self.trackio = trackio
        self.run_id = run_id or f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "philora"), name=self.run_id,
                                config=config, resume="allow", embed=False)

    def log(self, record: dict) -> None:
        data: Dict[str, Any] = dict(numbers(record))
        if "generations" in record:
            data["generations"] = self.trackio.Table(columns=COLUMNS, data=_rows(record))
        if data:
            self.run.log(data, step=record["step"])

    def finish(self, ok: bool) -> None:
        self.run.finish()


CLASSES = {"mlflow": MLflow, "wandb": WandB, "trackio": Trackio}


class Trackers:
    """The run's trackers (rank 0): ``log(record)`` for each metrics record; a context manager
    that finishes each run, marked failed when training raised."""

    def __init__(self, out: Path, names: List[str], config: dict, resume: bool):
        self.active: Dict[str, Any] = {}
        ids_path = out / IDS_FILE
        ids = {}
        if resume and ids_path.is_file():
            try:
                ids = json.loads(ids_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                ids = {}
        for name in names:
            if name not in CLASSES:
                continue  # tensorboard: metrics.py writes it
            try:
                self.active[name] = CLASSES[name](out, config, ids.get(name))
            except Exception as e:  # noqa: BLE001 (any failure of a third-party client, in one line)
                self.finish(False)
                raise PhiloraError(f"training_config.report_to: cannot start a {name} run: "
                                   f"{type(e).__name__}: {first_line(e)}") from None
        if self.active:
            out.mkdir(parents=True, exist_ok=True)
            ids_path.write_text(json.dumps({n: t.run_id for n, t in self.active.items()}), encoding="utf-8")

    def log(self, record: dict) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(record)
            except Exception as e:  # noqa: BLE001 (a dashboard must not stop training)
                del self.active[name]
                print(f"philora: warning: report_to {name}: {type(e).__name__}: {first_line(e)}; "
                      f"no longer reporting to {name} (metrics.jsonl has everything)", file=sys.stderr)

    def finish(self, ok: bool) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.finish(ok)
            except Exception as e:  # noqa: BLE001
                print(f"philora: warning: report_to {name}: could not finish the run: {first_line(e)}",
                      file=sys.stderr)
        self.active = {}

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exc_type is None)
