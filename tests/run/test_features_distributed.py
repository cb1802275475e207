"""Issue 13's features under torchrun (2 gloo CPU processes): DoRA + LoRA+ train as one process does
with the same global batch, and only rank 0 reports (eval generations once per evaluation; a tracker
gets each step once, from rank 0 alone). The tracker here is a recorder put in MLflow's place in both
ranks (needs no tracker package); what each real client's store holds is tests/run/test_trackers.py."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from philora.cli import main as cli_main
from philora.run.metrics import read_metrics

DRIVER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from philora.cli import main
    from philora.run import trackers

    class Recorder:  # in mlflow's place: what Trackers hands a tracker on this rank, one file per rank
        def __init__(self, out, config, run_id):
            self.run_id, self.path = "recorder", out.parent / f"tracker-rank{os.environ['RANK']}.jsonl"
            self.path.write_text(json.dumps({"config": config}) + "\\n")

        def log(self, record):
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\\n")

        def finish(self, ok):
            with open(self.path, "a") as f:
                f.write(json.dumps({"finished": ok}) + "\\n")

    trackers.CLASSES["mlflow"] = Recorder
    trackers.PACKAGES["mlflow"] = ("json", "-")  # the recorder needs no mlflow package
    out, common = Path(sys.argv[1]), sys.argv[2:]
    rc = main(["train", f"training_config.output_dir={out / 'ddp'}", *common,
               "training_config.per_device_train_batch_size=2", "training_config.report_to=[tensorboard,mlflow]"])
    (out / f"rc-{os.environ['RANK']}.json").write_text(json.dumps(rc))
""")


def test_dora_loraplus_generations_and_one_reporting_rank_under_torchrun(tmp_path, tiny_model_dir):
    common = [f"model.name_or_path={tiny_model_dir}", "training_config.max_steps=4", "training_config.save_steps=2",
              "training_config.eval_steps=2", "training_config.eval_max_samples=5",
              "training_config.per_device_eval_batch_size=2", "training_config.logging_steps=1",
              "training_config.report_samples=0", "training_config.progress_bar=false", "data.max_length=128",
              "peft_config.lora_dropout=0.0", "peft_config.use_dora=true", "peft_config.loraplus_lr_ratio=8",
              "training_config.eval_generations=2"]
    (tmp_path / "driver.py").write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.Popen([*torchrun, str(tmp_path / "driver.py"), str(tmp_path), *common], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # meanwhile, here: the same global batch in one process
        assert cli_main(["train", f"training_config.output_dir={tmp_path / 'single'}", *common,
                         "training_config.per_device_train_batch_size=4"]) == 0
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
    assert proc.returncode == 0, log[-3000:]
    assert [json.loads((tmp_path / f"rc-{r}.json").read_text()) for r in (0, 1)] == [0, 0]
    ddp, single = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ddp", "single"))
    assert ddp.keys() == single.keys() and any("lora_magnitude_vector" in k for k in ddp)
    for k in ddp:
        torch.testing.assert_close(ddp[k], single[k], atol=1e-4, rtol=1e-3, msg=k)
    records = read_metrics(tmp_path / "ddp")
    generations = [r for r in records if "generations" in r]
    assert [r["step"] for r in generations] == [0, 2, 4]  # rank 0 alone writes, once per evaluation
    single_generations = [r for r in read_metrics(tmp_path / "single") if "generations" in r]
    assert [len(r["generations"]) for r in generations] == [2, 2, 2]
    assert generations[0]["generations"] == single_generations[0]["generations"]  # the same model at step 0
    assert not (tmp_path / "tracker-rank1.jsonl").exists()  # rank 1 never starts a tracker
    lines = [json.loads(x) for x in (tmp_path / "tracker-rank0.jsonl").read_text().splitlines()]
    assert lines[0]["config"]["peft_config"]["use_dora"] is True and lines[-1] == {"finished": True}
    assert lines[1:-1] == records  # every record metrics.jsonl has, each once, in order
    assert [r["step"] for r in lines[1:-1] if "loss" in r] == [1, 2, 3, 4]
