"""philora.run.train end to end: the run directory, metrics and adapter of a short run on the built-in
tiny model, the PEFT round-trip of the saved adapter, and settings that change how, not what, the
loop computes.

Resume and an existing run directory: test_train_resume.py. The gradients (accumulation against an
independent reference, gradient checkpointing): test_train_accumulation.py. Runs use the built-in
tiny model (shipped data) or an even smaller GQA Phi-3 with the tiny model's tokenizer and chat
template (conftest), for a few steps each.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from philora.data.batching import epoch_order
from philora.run.checkpoint import list_checkpoints
from philora.core.config import config_to_dict, load_config
from philora.run.metrics import read_metrics
from philora.run.train import train

TRAIN_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"}
EVAL_FIELDS = {"step", "eval_loss", "eval_perplexity", "elapsed"}


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
def e2e(tiny_model_dir, philora_cache, tmp_path_factory, helpers):
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
        rec = helpers.install_recorder(mp)
        final = train(cfg, overwrite=True).metrics
    return cfg, out, final, rec


def test_e2e_output_dir(e2e, helpers):
    cfg, out, final, _ = e2e
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "config.yaml", "loss.png",
            "tensorboard", "tokenizer.json", "tokenizer_config.json", "notes.txt"} <= names
    assert "checkpoint-99" not in names and (out / "notes.txt").read_text() == "mine"
    # save_steps=2, save_total_limit=2: steps 2 and 4 were saved, only 4 and 6 are left
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    assert not [n for n in names if n.startswith(".")]  # no temporary checkpoint left behind
    for ckpt in list_checkpoints(out):
        assert {p.name for p in ckpt.iterdir()} == helpers.CKPT_FILES
        state = json.loads((ckpt / "trainer_state.json").read_text())
        step = int(ckpt.name.split("-")[1])
        assert state["step"] == step and state["samples_seen"] == step * 8
        assert load_config(ckpt / "config.yaml") == cfg
    assert load_config(out / "config.yaml") == cfg
    assert config_to_dict(load_config(out / "config.yaml")) == config_to_dict(cfg)
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_e2e_final_adapter_is_the_last_checkpoint(e2e, helpers):
    _, out, _, rec = e2e
    model = rec.models[-1]
    lora = load_file(str(out / "checkpoint-6" / "lora.safetensors"))
    state = model.state_dict()
    for k, v in lora.items():
        assert torch.equal(state[k], v), k
    peft = helpers.adapter_tensors(out)
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
    from philora.data.build import build_datasets
    from philora.model.loading import load_tokenizer
    train_set, _, _ = build_datasets(cfg.data, load_tokenizer(tiny_model_dir), cfg.training_config.seed,
                                     log=lambda *a: None)
    order = epoch_order(len(train_set), cfg.training_config.seed, 0, cfg.data.shuffle)
    assert sum(r["tokens"] for r in train_recs) == sum(len(train_set[i]["input_ids"]) for i in order[:48])


def test_e2e_peft_round_trip_all_linear(e2e):
    _, out, _, rec = e2e
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert_peft_round_trip(out, rec.models[-1])


# -----------------------------------------------------------------------------
# the PEFT round-trip of a per-slice adapter (block-diagonal export)


def test_peft_round_trip_per_slice_fused(tmp_path, small_model_dir, small_data, recorder, helpers):
    out = tmp_path / "run"
    cfg = helpers.make_cfg(out, small_model_dir, small_data, "training_config.max_steps=3",
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


def test_no_eval_set_means_no_eval(tmp_path, small_model_dir, small_data, helpers):
    """data.eval_fraction=0 and no eval file: nothing is evaluated (not an eval loss of 0)."""
    out = tmp_path / "run"
    final = train(helpers.make_cfg(out, small_model_dir, small_data, "data.eval=null", "data.eval_fraction=0",
                                   "training_config.max_steps=2", "training_config.eval_steps=1")).metrics
    records = read_metrics(out)
    assert not [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert "eval_loss" not in final
    assert (out / "adapter_model.safetensors").exists() and (out / "loss.png").exists()


def test_grad_norm_is_logged_without_clipping(tmp_path, small_model_dir, small_data, helpers):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        rec = helpers.install_recorder(mp)
        train(helpers.make_cfg(out, small_model_dir, small_data, "training_config.max_steps=2",
                               "training_config.max_grad_norm=0"))
    logged = [r["grad_norm"] for r in read_metrics(out) if "loss" in r]
    expected = [torch.linalg.vector_norm(torch.stack([g.double().norm() for _, g in step])).item() for step in rec.steps]
    assert logged == pytest.approx(expected, rel=1e-5)
    assert min(logged) > 0


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (1, 2), (5, 5)])
def test_lr_schedules_equal_transformers(name, warmup, total):
    """get_lr(step) is transformers' get_scheduler's rate at every step (and past the end)."""
    from transformers import get_scheduler

    from philora.run.schedule import get_lr

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    hf = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    theirs = [hf.get_last_lr()[0]]
    for _ in range(total + 2):
        opt.step()
        hf.step()
        theirs.append(hf.get_last_lr()[0])
    ours = [get_lr(step, 2e-3, name, warmup, total) for step in range(total + 3)]
    assert ours == theirs  # the same product, so the same floats
    assert len(set(ours)) > 1 or name == "constant"


def test_training_imports_neither_peft_nor_bitsandbytes(tmp_path, small_model_dir, small_data, helpers):
    """A plain LoRA run needs neither (they cost seconds of start-up and print warnings)."""
    args = helpers.make_args(tmp_path / "run", small_model_dir, small_data, "training_config.max_steps=1")
    code = ("import sys\nfrom philora.core.config import load_config\nfrom philora.run.train import train\n"
            f"train(load_config(None, {list(map(str, args))!r}))\n"
            "print('LOADED', sorted(m for m in ('peft', 'bitsandbytes', 'trl') if m in sys.modules))\n")
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LOADED []" in res.stdout, res.stdout[-500:]


def test_prepare_applies_the_patches_in_order_and_the_close_undoes_neftune(small_model_dir):
    """Inference loads get attention and LongRoPE only; training loads the fused MLPs and no KV
    cache; prepare() adds LoRA, NEFTune (its hooks gone when the run's ExitStack closes) and the
    wrapper last, around the loss object it is given."""
    import contextlib

    from philora.core.config import Config, ModelConfig, PeftConfig, TrainingConfig
    from philora.model.loading import load_model_and_tokenizer
    from philora.model.loss import CausalLMLoss
    from philora.model.prepare import Process, prepare

    mc = ModelConfig(name_or_path=small_model_dir, dtype="float32")
    plain, _, _ = load_model_and_tokenizer(mc, torch.device("cpu"), training=False)
    assert plain.config.use_cache and not any("forward" in vars(m) for m in plain.modules())
    model, tok, _ = load_model_and_tokenizer(mc, torch.device("cpu"), training=True)
    assert not model.config.use_cache and any("forward" in vars(m) for m in model.modules())  # fused MLPs
    cfg = Config(model=mc, peft_config=PeftConfig(r=2, lora_alpha=4, target_modules=["o_proj"]),
                 training_config=TrainingConfig(neftune_noise_alpha=5.0))
    wrapped, lines = [], []
    with contextlib.ExitStack() as held:
        loss_fn = prepare(model, CausalLMLoss(model), cfg, [], tok.pad_token_id,
                          Process(torch.device("cpu"), held, wrap=lambda m: wrapped.append(m) or m, log=lines.append))
        assert wrapped == [loss_fn] and loss_fn.training
        assert any(n.endswith("lora_A") for n, p in model.named_parameters() if p.requires_grad)
        assert lines[0].startswith("trainable params: ")
        embed = model.get_input_embeddings()
        assert embed._forward_hooks
    assert not embed._forward_hooks  # NEFTune removed on close
