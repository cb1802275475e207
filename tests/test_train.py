"""philora.train end to end: run outputs, the accumulation math against an independent reference,
exact resume, atomic checkpoints, and the PEFT round-trip of the saved adapter.

Runs use the built-in tiny model (shipped data) or an even smaller GQA Phi-3 with the tiny model's
tokenizer and chat template, for a few steps each.
"""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from philora import checkpoint
from philora import train as train_mod
from philora.batching import epoch_order
from philora.checkpoint import list_checkpoints
from philora.config import config_to_dict, load_config
from philora.errors import PhiloraError
from philora.metrics import read_metrics
from philora.train import train

CKPT_FILES = {"lora.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "config.yaml"}
TRAIN_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"}
EVAL_FIELDS = {"step", "eval_loss", "eval_perplexity", "elapsed"}


class Killed(Exception):
    """Stands for the process being killed."""


# -----------------------------------------------------------------------------
# fixtures


def make_cfg(out, model, data, *overrides):
    return load_config(None, make_args(out, model, data, *overrides))


def make_args(out, model, data, *overrides):
    train_file, eval_file = data
    return [
        f"model.name_or_path={model}", f"data.train={train_file}", f"data.eval={eval_file}",
        "data.max_length=128", f"training_config.output_dir={out}", "training_config.max_steps=4",
        "training_config.per_device_train_batch_size=4", "training_config.per_device_eval_batch_size=8",
        "training_config.logging_steps=1", "training_config.eval_steps=0", "training_config.save_steps=0",
        "training_config.report_samples=0", "training_config.progress_bar=false",
        "training_config.warmup_steps=1", "training_config.learning_rate=5e-3",
        "peft_config.r=4", "peft_config.lora_alpha=8", *overrides]


class Recorder:
    """Records the model train() builds and, at every optimizer step, the trainable parameters
    and their gradients (before the update); optionally 'kills' the run at a given step."""

    def __init__(self):
        self.models, self.steps, self.kill_at = [], [], None

    def names(self):
        return [n for n, p in self.models[-1].named_parameters() if p.requires_grad]


def install_recorder(mp) -> Recorder:
    rec = Recorder()
    real_inject = train_mod.inject_lora

    def inject(model, *args, **kwargs):
        rec.models.append(model)
        return real_inject(model, *args, **kwargs)

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            rec.steps.append([(p.detach().clone(), p.grad.detach().clone()) for p in params])
            if rec.kill_at is not None and len(rec.steps) == rec.kill_at:
                raise Killed(f"killed at step {rec.kill_at}")
            return super().step(closure)

    mp.setattr(train_mod, "inject_lora", inject)
    mp.setattr(torch.optim, "AdamW", RecordingAdamW)
    return rec


@pytest.fixture
def recorder(monkeypatch):
    return install_recorder(monkeypatch)


def adapter_tensors(out):
    return load_file(str(Path(out) / "adapter_model.safetensors"))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def chat_ids(tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    msgs = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."}]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt")
    return out["input_ids"]


def assert_peft_round_trip(out, model):
    """AutoPeftModelForCausalLM loads output_dir unaided and computes the same logits."""
    from peft import AutoPeftModelForCausalLM
    cfg = json.loads((Path(out) / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).is_dir()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    model.eval()
    ids = chat_ids(out)
    with torch.no_grad():
        expected = model(ids).logits
        got = peft_model(ids).logits
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base = plain(ids).logits
    assert (expected - base).abs().max() > 1e-3  # training changed the function: the check has teeth
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# end to end on the built-in tiny model and the shipped sample data


@pytest.fixture(scope="module")
def e2e(tiny_model_dir, philora_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    # a stale run in the way, plus a file of the user's: --overwrite replaces only philora's files
    (out / "checkpoint-99").mkdir(parents=True)
    (out / "checkpoint-99" / "trainer_state.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    (out / "notes.txt").write_text("mine")
    cfg = load_config(None, [
        f"training_config.output_dir={out}", "training_config.max_steps=6", "training_config.eval_steps=4",
        "training_config.save_steps=2", "training_config.save_total_limit=2", "training_config.logging_steps=2",
        "training_config.eval_max_samples=16", "training_config.report_samples=0",
        "training_config.progress_bar=false"])
    assert cfg.model.name_or_path == "tiny" and cfg.data.train == "sample" and cfg.peft_config.lora_dropout > 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHILORA_CACHE", str(philora_cache))
        rec = install_recorder(mp)
        final = train(cfg, overwrite=True)
    return cfg, out, final, rec


def test_e2e_output_dir(e2e):
    cfg, out, final, _ = e2e
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "config.yaml", "loss.png",
            "tensorboard", "tokenizer.json", "tokenizer_config.json", "notes.txt"} <= names
    assert "checkpoint-99" not in names and (out / "notes.txt").read_text() == "mine"
    # save_steps=2, save_total_limit=2: steps 2 and 4 were saved, only 4 and 6 are left
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    assert not [n for n in names if n.startswith(".")]  # no temporary checkpoint left behind
    for ckpt in list_checkpoints(out):
        assert {p.name for p in ckpt.iterdir()} == CKPT_FILES
        state = json.loads((ckpt / "trainer_state.json").read_text())
        step = int(ckpt.name.split("-")[1])
        assert state["step"] == step and state["samples_seen"] == step * 8
        assert load_config(ckpt / "config.yaml") == cfg
    assert load_config(out / "config.yaml") == cfg
    assert config_to_dict(load_config(out / "config.yaml")) == config_to_dict(cfg)
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_e2e_final_adapter_is_the_last_checkpoint(e2e):
    _, out, _, rec = e2e
    model = rec.models[-1]
    lora = load_file(str(out / "checkpoint-6" / "lora.safetensors"))
    state = model.state_dict()
    for k, v in lora.items():
        assert torch.equal(state[k], v), k
    peft = adapter_tensors(out)
    assert len(peft) == len(lora)  # all-linear, whole modules: one A and one B per layer
    for k, v in lora.items():
        assert torch.equal(peft["base_model.model." + k.replace(".lora_A", ".lora_A.weight")
                                .replace(".lora_B", ".lora_B.weight")], v), k


def test_e2e_metrics(e2e, tiny_model_dir):
    cfg, out, final, _ = e2e
    records = read_metrics(out)
    assert all(r.get("step") != 99 for r in records)  # the stale run's metrics are gone
    train_recs = [r for r in records if "loss" in r]
    eval_recs = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4, 6]
    assert [r["step"] for r in eval_recs] == [0, 4, 6]
    for r in train_recs:
        assert TRAIN_FIELDS <= set(r), r
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert 0 <= r["lr"] <= cfg.training_config.learning_rate
    for r in eval_recs:
        assert EVAL_FIELDS <= set(r), r
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-9)
    elapsed = [r["elapsed"] for r in records]
    assert elapsed == sorted(elapsed)
    assert final["eval_loss"] == eval_recs[-1]["eval_loss"]
    assert eval_recs[-1]["eval_loss"] < eval_recs[0]["eval_loss"]  # it learns
    # the tokens logged are those of the 6 x 8 samples the run read, in the seeded order
    from philora.data import build_datasets
    from philora.loading import load_tokenizer
    train_set, _, _ = build_datasets(cfg.data, load_tokenizer(tiny_model_dir), cfg.training_config.seed,
                                     log=lambda *a: None)
    order = epoch_order(len(train_set), cfg.training_config.seed, 0, cfg.data.shuffle)
    assert sum(r["tokens"] for r in train_recs) == sum(len(train_set[i]["input_ids"]) for i in order[:48])


def test_e2e_peft_round_trip_all_linear(e2e):
    _, out, _, rec = e2e
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert_peft_round_trip(out, rec.models[-1])


def test_existing_run_is_refused_and_kept(tmp_path, small_model_dir, small_data):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2}')
    (out / "adapter_model.safetensors").write_bytes(b"x")
    (out / "metrics.jsonl").write_text("{}\n")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(PhiloraError) as e:
        train(make_cfg(out, small_model_dir, small_data))
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and "--resume" in msg and "--overwrite" in msg
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_resume_without_a_checkpoint_is_an_error(tmp_path, small_model_dir, small_data):
    with pytest.raises(PhiloraError) as e:
        train(make_cfg(tmp_path / "empty", small_model_dir, small_data), resume=True)
    assert "\n" not in str(e.value) and "empty" in str(e.value)


def test_a_bad_setting_is_caught_before_overwrite_deletes(tmp_path, small_model_dir, small_data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    cfg = make_cfg(out, small_model_dir, small_data)  # valid on load, then changed in code
    cfg = dataclasses.replace(cfg, training_config=dataclasses.replace(cfg.training_config,
                                                                       gradient_accumulation_steps=0))
    with pytest.raises(PhiloraError) as e:
        train(cfg, overwrite=True)
    assert "gradient_accumulation_steps" in str(e.value)
    assert (out / "metrics.jsonl").exists()


# -----------------------------------------------------------------------------
# the accumulation math


SHORT, LONG = "Yes.", ("Sure: the quick brown fox jumps over the lazy dog, and then it runs far away into the "
                       "green forest where nobody can find it again, not even the farmer.")


@pytest.fixture(scope="module")
def accum_data(tmp_path_factory):
    """8 conversations; samples 0-1 (and 4-5) have short answers, 2-3 (and 6-7) long ones, so the two
    micro-batches of a 2 x 2 step have very different numbers of label tokens."""
    d = tmp_path_factory.mktemp("accum")
    rows = []
    for i in range(8):
        answer = SHORT if i % 4 < 2 else LONG + f" Number {i}."
        rows.append({"messages": [{"role": "user", "content": f"Question {i}: say something."},
                                  {"role": "assistant", "content": answer}]})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]), encoding="utf-8")
    return d / "train.jsonl", d / "eval.jsonl"


def reference_loss_and_grads(model_dir, examples, lora_values=None, r=4, alpha=8):
    """sum of per-token cross-entropies / number of label tokens, from the unmodified HF model's
    logits, one example at a time; with ``lora_values`` through a PEFT model holding those
    factors, returning the gradients too."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if lora_values is not None:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear"))
        params = {}
        for name, value in lora_values.items():  # "model.layers.0.mlp.down_proj.lora_A"
            module, ab = name.rsplit(".", 1)
            p = getattr(model.base_model.model.get_submodule(module), ab)["default"].weight
            with torch.no_grad():
                p.copy_(value)
            params[name] = p
    model.train()  # no dropout anywhere: same as eval, but like training
    total, count = torch.zeros((), dtype=torch.float64), 0
    losses = []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor(ex["labels"][1:])
        logits = model(ids).logits[0, :-1]
        keep = labels != -100
        losses.append(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    loss = torch.stack(losses).sum() / count
    if lora_values is None:
        return loss.item(), None
    loss.backward()
    return loss.item(), {n: p.grad for n, p in params.items()}


@pytest.mark.parametrize("packing", [True, False])
def test_accumulation_matches_one_big_batch_and_the_reference(tmp_path, small_model_dir, accum_data, packing):
    common = ["training_config.max_steps=2", "data.shuffle=false", f"data.packing={str(packing).lower()}",
              "peft_config.lora_dropout=0.0", "training_config.max_grad_norm=0", "training_config.warmup_steps=0",
              "training_config.lr_scheduler_type=constant"]
    runs = {}
    for accum, batch in ((2, 2), (1, 4)):
        with pytest.MonkeyPatch.context() as mp:
            rec = install_recorder(mp)
            cfg = make_cfg(tmp_path / f"run-{accum}x{batch}", small_model_dir, accum_data, *common,
                           f"training_config.gradient_accumulation_steps={accum}",
                           f"training_config.per_device_train_batch_size={batch}")
            train(cfg)
        runs[accum] = (cfg, rec)
    cfg, rec = runs[2]
    names = rec.names()
    assert names == runs[1][1].names() and len(rec.steps) == 2

    from philora.data import build_datasets
    from philora.loading import load_tokenizer
    train_set, _, _ = build_datasets(cfg.data, load_tokenizer(small_model_dir), 0, log=lambda *a: None)
    assert len(train_set) == 8

    def labels(exs):
        return sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in exs)
    assert labels(train_set[2:4]) > 3 * labels(train_set[0:2])  # unequal micro-batches

    # the logged step-1 loss is the token-weighted loss of the unmodified model (B = 0 at step 1)
    ref_loss, _ = reference_loss_and_grads(small_model_dir, train_set[0:4])
    mean_of_means = (reference_loss_and_grads(small_model_dir, train_set[0:2])[0]
                     + reference_loss_and_grads(small_model_dir, train_set[2:4])[0]) / 2
    assert abs(mean_of_means - ref_loss) > 1e-2  # the check can tell the two apart
    for accum in (2, 1):
        step1 = [r for r in read_metrics(runs[accum][0].training_config.output_dir) if r.get("step") == 1 and "loss" in r]
        assert step1[0]["loss"] == pytest.approx(ref_loss, rel=2e-6, abs=2e-6)

    for s in range(2):
        examples = train_set[4 * s:4 * s + 4]
        before = {n: v for n, (v, _) in zip(names, rec.steps[s])}
        grads_2x2 = {n: g for n, (_, g) in zip(names, rec.steps[s])}
        grads_1x4 = {n: g for n, (_, g) in zip(names, runs[1][1].steps[s])}
        for n, (v, _) in zip(names, runs[1][1].steps[s]):
            if s == 0:  # the same initial adapter in both runs
                assert torch.equal(before[n], v), n
            else:  # and the same adapter after one AdamW step. Adam's first step is
                # lr * g / (|g| + eps): rounding noise in a near-zero gradient (|g| ~ 1e-7) moves
                # that element by up to ~1e-7 of the lr 5e-3 step, hence atol 1e-6 (lr / 5000)
                assert_close(before[n], v, rtol=1e-5, atol=1e-6, msg=n)
        for n in names:  # the same gradients
            assert_close(grads_2x2[n], grads_1x4[n], rtol=1e-4, atol=1e-7)
        _, ref_grads = reference_loss_and_grads(small_model_dir, examples, before)
        nonzero = 0
        for n in names:
            assert_close(grads_2x2[n], ref_grads[n], rtol=1e-4, atol=1e-7)
            nonzero += int(ref_grads[n].abs().max() > 0)
        assert nonzero == (len(names) // 2 if s == 0 else len(names))  # step 1: zero lora_A grads (B = 0)
    # and the same adapter after the AdamW steps
    a, b = adapter_tensors(runs[2][0].training_config.output_dir), adapter_tensors(runs[1][0].training_config.output_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


# -----------------------------------------------------------------------------
# resume


RESUME = ["training_config.max_steps=6", "training_config.save_steps=2", "training_config.save_total_limit=2",
          "peft_config.lora_dropout=0.2", "training_config.eval_steps=3"]


@pytest.fixture(scope="module")
def full_run(small_model_dir, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train(make_cfg(out, small_model_dir, small_data, *RESUME))
    return out


def train_records(out):
    return [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")}
            for r in read_metrics(out)]


def test_resume_after_a_kill_is_bit_identical(tmp_path, small_model_dir, small_data, full_run, recorder):
    out = tmp_path / "run"
    cfg = make_cfg(out, small_model_dir, small_data, *RESUME)
    recorder.kill_at = 6  # steps 1-5 done (checkpoints 2 and 4), killed during step 6
    with pytest.raises(Killed):
        train(cfg)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "adapter_model.safetensors").exists()
    recorder.kill_at = None
    train(cfg, resume=True)
    assert_same_tensors(adapter_tensors(out), adapter_tensors(full_run))
    assert_same_tensors(load_file(str(out / "checkpoint-6" / "lora.safetensors")),
                        load_file(str(full_run / "checkpoint-6" / "lora.safetensors")))
    # metrics.jsonl continues the killed run: each step once, the same values as uninterrupted
    assert train_records(out) == train_records(full_run)


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, small_model_dir, small_data, full_run,
                                                        monkeypatch):
    out = tmp_path / "run"
    cfg = make_cfg(out, small_model_dir, small_data, *RESUME, "training_config.save_total_limit=1")
    calls = []
    real = checkpoint.rng_state

    def dying_rng_state():
        calls.append(1)
        if len(calls) == 2:  # the save at step 4, after LoRA, optimizer and scheduler were written
            raise Killed("killed while saving")
        return real()
    monkeypatch.setattr(checkpoint, "rng_state", dying_rng_state)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert {p.name for p in (out / "checkpoint-2").iterdir()} == CKPT_FILES
    train(cfg, resume=True)  # the earlier checkpoint loads, and the run ends as if never killed
    assert_same_tensors(adapter_tensors(out), adapter_tensors(full_run))


def test_resume_with_another_lora_config_is_a_one_line_error(tmp_path, small_model_dir, small_data, full_run):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    cfg = make_cfg(out, small_model_dir, small_data, *RESUME, "peft_config.r=2")
    with pytest.raises(PhiloraError) as e:
        train(cfg, resume=True)
    assert "\n" not in str(e.value) and "checkpoint-6" in str(e.value)


# -----------------------------------------------------------------------------
# the PEFT round-trip of a per-slice adapter (block-diagonal export)


def test_peft_round_trip_per_slice_fused(tmp_path, small_model_dir, small_data, recorder):
    out = tmp_path / "run"
    cfg = make_cfg(out, small_model_dir, small_data, "training_config.max_steps=3",
                   "peft_config.target_modules=[o_proj]", "peft_config.fused_slices={qkv_proj: [q, v]}")
    train(cfg)
    model = recorder.models[-1]
    layer = model.model.layers[0].self_attn.qkv_proj
    assert layer.enable_lora == [True, False, True] and list(layer.split_sizes) == [64, 32, 32]
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == ["o_proj", "qkv_proj"]
    assert_peft_round_trip(out, model)


# -----------------------------------------------------------------------------
# settings that change how, not what, the loop computes


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, small_model_dir, small_data):
    """model.gradient_checkpointing recomputes activations; LoRA gradients must not change."""
    common = ["training_config.max_steps=2", "peft_config.lora_dropout=0.0", "training_config.max_grad_norm=0",
              "training_config.warmup_steps=0", "training_config.warmup_ratio=0"]
    recs = {}
    for gc in ("false", "true"):
        with pytest.MonkeyPatch.context() as mp:
            recs[gc] = install_recorder(mp)
            train(make_cfg(tmp_path / gc, small_model_dir, small_data, *common, f"model.gradient_checkpointing={gc}"))
    assert recs["true"].models[-1].is_gradient_checkpointing and not recs["false"].models[-1].is_gradient_checkpointing
    for s in range(2):
        for n, (_, g0), (_, g1) in zip(recs["false"].names(), recs["false"].steps[s], recs["true"].steps[s]):
            assert g0.abs().max() > 0 or s == 0
            assert_close(g1, g0, rtol=1e-5, atol=1e-8, msg=n)


def test_no_eval_set_means_no_eval(tmp_path, small_model_dir, small_data):
    """data.eval_fraction=0 and no eval file: nothing is evaluated (not an eval loss of 0)."""
    out = tmp_path / "run"
    final = train(make_cfg(out, small_model_dir, small_data, "data.eval=null", "data.eval_fraction=0",
                           "training_config.max_steps=2", "training_config.eval_steps=1"))
    records = read_metrics(out)
    assert not [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert "eval_loss" not in final
    assert (out / "adapter_model.safetensors").exists() and (out / "loss.png").exists()


def test_grad_norm_is_logged_without_clipping(tmp_path, small_model_dir, small_data):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        rec = install_recorder(mp)
        train(make_cfg(out, small_model_dir, small_data, "training_config.max_steps=2", "training_config.max_grad_norm=0"))
    logged = [r["grad_norm"] for r in read_metrics(out) if "loss" in r]
    expected = [torch.linalg.vector_norm(torch.stack([g.double().norm() for _, g in step])).item() for step in rec.steps]
    assert logged == pytest.approx(expected, rel=1e-5)
    assert min(logged) > 0


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (1, 2), (5, 5)])
def test_lr_schedules_equal_transformers(name, warmup, total):
    from transformers import get_scheduler

    from philora.train import lr_scheduler

    def lrs(make):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        sched = make(opt)
        out = [sched.get_last_lr()[0]]
        for _ in range(total + 2):
            opt.step()
            sched.step()
            out.append(sched.get_last_lr()[0])
        return out, sched

    ours, sched = lrs(lambda opt: lr_scheduler(name, opt, warmup, total))
    theirs, hf_sched = lrs(lambda opt: get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total))
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    assert len(set(ours)) > 1 or name == "constant"
    # a scheduler state written by transformers' get_scheduler (older checkpoints) loads into ours
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    mine = lr_scheduler(name, opt, warmup, total)
    mine.load_state_dict(hf_sched.state_dict())
    assert mine.get_last_lr() == pytest.approx(hf_sched.get_last_lr())


def test_training_imports_neither_peft_nor_bitsandbytes(tmp_path, small_model_dir, small_data):
    """A plain LoRA run needs neither (they cost seconds of start-up and print warnings)."""
    code = ("import sys\nfrom philora.config import load_config\nfrom philora.train import train\n"
            f"train(load_config(None, {list(map(str, make_args(tmp_path / 'run', small_model_dir, small_data, 'training_config.max_steps=1')))!r}))\n"
            "print('LOADED', sorted(m for m in ('peft', 'bitsandbytes', 'trl') if m in sys.modules))\n")
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LOADED []" in res.stdout, res.stdout[-500:]
