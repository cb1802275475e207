"""philora.run.train's gradients: accumulation over micro-batches equals one big batch and an independent
reference (token-weighted loss from plain transformers + peft), and gradient checkpointing changes
nothing.

Runs use a small GQA Phi-3 with the tiny model's tokenizer and chat template (conftest).
"""

import json

import pytest
import torch
from torch.testing import assert_close

from philora.run.metrics import read_metrics
from philora.run.train import train


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
    count = 0
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
def test_accumulation_matches_one_big_batch_and_the_reference(tmp_path, small_model_dir, accum_data, packing, helpers):
    common = ["training_config.max_steps=2", "data.shuffle=false", f"data.packing={str(packing).lower()}",
              "peft_config.lora_dropout=0.0", "training_config.max_grad_norm=0", "training_config.warmup_steps=0",
              "training_config.lr_scheduler_type=constant"]
    runs = {}
    for accum, batch in ((2, 2), (1, 4)):
        with pytest.MonkeyPatch.context() as mp:
            rec = helpers.install_recorder(mp)
            cfg = helpers.make_cfg(tmp_path / f"run-{accum}x{batch}", small_model_dir, accum_data, *common,
                           f"training_config.gradient_accumulation_steps={accum}",
                           f"training_config.per_device_train_batch_size={batch}")
            train(cfg)
        runs[accum] = (cfg, rec)
    cfg, rec = runs[2]
    names = rec.names()
    assert names == runs[1][1].names() and len(rec.steps) == 2

    from philora.data.build import build_datasets
    from philora.model.loading import load_tokenizer
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
    a, b = (helpers.adapter_tensors(runs[accum][0].training_config.output_dir) for accum in (2, 1))
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, small_model_dir, small_data, helpers):
    """model.gradient_checkpointing recomputes activations; LoRA gradients must not change."""
    common = ["training_config.max_steps=2", "peft_config.lora_dropout=0.0", "training_config.max_grad_norm=0",
              "training_config.warmup_steps=0", "training_config.warmup_ratio=0"]
    recs = {}
    for gc in ("false", "true"):
        with pytest.MonkeyPatch.context() as mp:
            recs[gc] = helpers.install_recorder(mp)
            train(helpers.make_cfg(tmp_path / gc, small_model_dir, small_data, *common,
                                   f"model.gradient_checkpointing={gc}"))
    assert recs["true"].models[-1].is_gradient_checkpointing and not recs["false"].models[-1].is_gradient_checkpointing
    for s in range(2):
        for n, (_, g0), (_, g1) in zip(recs["false"].names(), recs["false"].steps[s], recs["true"].steps[s]):
            assert g0.abs().max() > 0 or s == 0
            assert_close(g1, g0, rtol=1e-5, atol=1e-8, msg=n)

