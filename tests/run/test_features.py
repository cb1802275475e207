"""Training features of issue 13, each by its effect: LoRA+ (peft's groups; every update is AdamW's
formula with B at R times A's rate, through schedule, accumulation and resume), NEFTune
(transformers' noise per conversation, in training only), the warnings before training, and
eval_generations (at every evaluation: metrics.jsonl, TensorBoard, report.md)."""

import json
import math

import pytest
import torch
from torch.testing import assert_close

from philora.data.batching import collate
from philora.core.config import load_config
from philora.run.metrics import read_metrics
from philora.model.neftune import NEFTune
from philora.run.optim import advice, make_optimizer
from philora.use.report import end_of_run
from philora.run.train import train


# -----------------------------------------------------------------------------
# LoRA+

def gpt2_dora(**kw):
    """A tiny GPT-2 (Conv1D layers with biases, LayerNorms): every kind of tensor LoRA+ groups."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32, **kw))


def test_loraplus_groups_are_peft_s():
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    from philora.core.config import PeftConfig
    from philora.model.inject import inject_lora
    cfg = load_config(None, ["peft_config.loraplus_lr_ratio=16", "training_config.learning_rate=1e-3",
                             "training_config.weight_decay=0.01"])
    mine = gpt2_dora()
    inject_lora(mine, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="all", use_dora=True,
                                 target_modules=["c_attn", "c_fc"]))
    theirs = get_peft_model(gpt2_dora(), LoraConfig(r=4, lora_alpha=8, bias="all", use_dora=True,
                                                   target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                          loraplus_weight_decay=0.01)

    def settings(model, optimizer, rename=lambda n: n):
        names = {id(p): rename(n) for n, p in model.named_parameters()}
        return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    got = settings(mine, make_optimizer(mine, cfg))
    want = settings(theirs, reference, lambda n: n.replace("base_model.model.", "").replace(".default.weight", "")
                    .replace(".base_layer", ""))
    assert got == want
    kinds = {v: [n for n in got if got[n] == v] for v in set(got.values())}
    assert set(kinds) == {(1e-3, 0.01), (16e-3, 0.01), (16e-3, 0.0)}  # A; B and magnitudes; biases
    assert all("lora_A" in n for n in kinds[(1e-3, 0.01)])
    assert any("ln_1.bias" in n for n in kinds[(16e-3, 0.0)])
    assert any("lora_magnitude_vector" in n for n in kinds[(16e-3, 0.01)])


LORAPLUS = ["peft_config.loraplus_lr_ratio=4", "training_config.gradient_accumulation_steps=2",
            "training_config.weight_decay=0.1", "training_config.max_steps=4", "training_config.save_steps=2",
            "training_config.warmup_steps=1", "training_config.lr_scheduler_type=cosine",
            "training_config.learning_rate=1e-2"]


def cosine(step, warmup, total):  # transformers' get_cosine_schedule_with_warmup, written out
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def test_loraplus_updates_are_adamw_with_b_at_ratio(tmp_path, small_model_dir, small_data, monkeypatch, helpers):
    rec = helpers.install_recorder(monkeypatch)

    class Steps(torch.optim.AdamW):  # the recorder's, which can stop a run
        """Records, at every step, each tensor's rate, decay, value and gradient before the update."""
        log = []

        def step(self, closure=None):
            Steps.log.append([(p, g["lr"], g["weight_decay"], p.detach().clone(), p.grad.detach().clone())
                              for g in self.param_groups for p in g["params"]])
            return super().step(closure)
    monkeypatch.setattr(torch.optim, "AdamW", Steps)
    train(helpers.make_cfg(tmp_path / "run", small_model_dir, small_data, *LORAPLUS))
    model = rec.models[-1]
    names = {id(p): n for n, p in model.named_parameters()}
    final = {id(p): p.detach().clone() for p in model.parameters()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    moments = {}
    for t, entries in enumerate(Steps.log):
        base = 1e-2 * cosine(t, 1, 4)
        for p, lr, wd, value, grad in entries:
            is_b = "lora_B" in names[id(p)]
            assert lr == pytest.approx(base * (4 if is_b else 1), rel=1e-12, abs=1e-15), (t, names[id(p)])
            assert wd == 0.1
            # AdamW (torch's formula, in float64): decoupled decay, bias-corrected moments.
            m, v = moments.get(id(p), (torch.zeros_like(grad, dtype=torch.float64),) * 2)
            g = grad.double()
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            moments[id(p)] = (m, v)
            want = value.double() * (1 - lr * wd) - lr / (1 - b1 ** (t + 1)) * m / (
                (v / (1 - b2 ** (t + 1))).sqrt() + eps)
            after = Steps.log[t + 1][[id(e[0]) for e in Steps.log[t + 1]].index(id(p))][3] \
                if t + 1 < len(Steps.log) else final[id(p)]
            assert_close(after.double(), want, rtol=1e-5, atol=1e-7, msg=f"step {t + 1} {names[id(p)]}")
    assert len(Steps.log) == 4 and any("lora_B" in n for n in names.values())
    # A resume continues the same groups and schedule: bit-identical to the run above.
    out = tmp_path / "killed"
    rec.steps.clear()
    rec.kill_at = 3
    with pytest.raises(helpers.Killed):
        train(helpers.make_cfg(out, small_model_dir, small_data, *LORAPLUS))
    rec.kill_at = None
    train(helpers.make_cfg(out, small_model_dir, small_data, *LORAPLUS), resume=True)
    want, got = helpers.adapter_tensors(tmp_path / "run"), helpers.adapter_tensors(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_loraplus_first_step_moves_b_ratio_times_as_far(tmp_path, small_model_dir, small_data, helpers):
    one = ["training_config.max_steps=1", "training_config.warmup_steps=0", "training_config.lr_scheduler_type=constant"]
    train(helpers.make_cfg(tmp_path / "plain", small_model_dir, small_data, *one))
    train(helpers.make_cfg(tmp_path / "plus", small_model_dir, small_data, *one, "peft_config.loraplus_lr_ratio=8"))
    plain, plus = helpers.adapter_tensors(tmp_path / "plain"), helpers.adapter_tensors(tmp_path / "plus")
    for k in plain:  # B starts at zero, so its first move is the update itself; A has no gradient yet
        if "lora_B" in k:
            assert plain[k].abs().max() > 0
            assert_close(plus[k], 8 * plain[k], rtol=1e-5, atol=1e-9)
        else:
            assert torch.equal(plus[k], plain[k])


# -----------------------------------------------------------------------------
# NEFTune

def embeddings_seen(model):
    """A hook recording what the decoder layers receive from the input embeddings."""
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    return seen


def test_neftune_is_transformers_noise_on_one_conversation(base_dir, helpers):
    from transformers.integrations.neftune import neftune_post_forward_hook
    ids = helpers.token_ids()  # 2 rows of 11 tokens, no padding: transformers' length is each row's own
    theirs = helpers.load_model(base_dir).train()
    theirs.get_input_embeddings().neftune_noise_alpha = 5.0
    theirs.get_input_embeddings().register_forward_hook(neftune_post_forward_hook)
    want = embeddings_seen(theirs)
    mine = helpers.load_model(base_dir).train()
    NEFTune(mine, 5.0)
    got = embeddings_seen(mine)
    for model, position_ids in ((theirs, None), (mine, None), (mine, torch.arange(11).expand(2, 11))):
        torch.manual_seed(0)
        model(input_ids=ids, position_ids=position_ids)
    assert torch.equal(got[0], want[0])  # the very same formula and draws
    assert_close(got[1], want[0], rtol=0, atol=1e-7)  # per position: the same values
    clean = helpers.load_model(base_dir).get_input_embeddings()(ids).detach()
    assert (got[0] - clean).abs().max() <= 5.0 / math.sqrt(11 * 64) + 1e-7


def test_neftune_per_conversation_packed_and_padded_and_never_in_eval(base_dir, helpers):
    model = helpers.load_model(base_dir)
    neftune = NEFTune(model, 8.0)
    seen = embeddings_seen(model)
    g = torch.Generator().manual_seed(0)
    convs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (40, 9, 23)]
    examples = [{"input_ids": c, "labels": c} for c in convs]
    clean = lambda ids: torch.nn.functional.embedding(ids, model.get_input_embeddings().weight)  # noqa: E731
    for packing in (True, False):
        batch = collate(examples, 0, packing, 128)
        inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
        model.train()
        torch.manual_seed(1)
        model(**inputs)
        noise = seen.pop() - clean(batch["input_ids"]).detach()
        spans = []  # (row, start, length) of each conversation, from the batch itself
        for r in range(batch["input_ids"].shape[0]):
            if packing:
                pos = batch["position_ids"][r].tolist()
                starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
                spans += [(r, s, e - s) for s, e in zip(starts, starts[1:]) if e - s in (40, 9, 23)]
            else:
                spans.append((r, 0, int(batch["attention_mask"][r].sum())))
        assert sorted(n for _, _, n in spans) == [9, 23, 40]
        for r, s, n in spans:
            bound = 8.0 / math.sqrt(n * 64)  # transformers' magnitude with this conversation's length
            part = noise[r, s:s + n].abs()
            assert part.max() <= bound * (1 + 1e-5) and part.max() > 0.95 * bound, (packing, n)
        model.eval()  # evaluation and generation: no noise
        model(**inputs)
        assert torch.equal(seen.pop(), clean(batch["input_ids"]).detach())
    neftune.remove()
    model.train()
    model(input_ids=batch["input_ids"])
    assert torch.equal(seen.pop(), clean(batch["input_ids"]).detach())


def test_neftune_changes_the_training_loss_not_the_eval_loss(tmp_path, small_model_dir, small_data, helpers):
    args = ["training_config.max_steps=2"]
    train(helpers.make_cfg(tmp_path / "plain", small_model_dir, small_data, *args))
    noisy = train(helpers.make_cfg(tmp_path / "noisy", small_model_dir, small_data, *args,
                                   "training_config.neftune_noise_alpha=20"))
    plain, with_noise = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "noisy")
    losses = [[r["loss"] for r in m if r.get("step") == 1 and "loss" in r][0] for m in (plain, with_noise)]
    evals = [[r["eval_loss"] for r in m if r.get("step") == 0 and "eval_loss" in r][0] for m in (plain, with_noise)]
    assert abs(losses[0] - losses[1]) > 1e-4  # same weights, same batch: only the noise differs
    assert evals[0] == evals[1]  # evaluation never sees it
    embeddings = noisy.model.get_input_embeddings()
    assert not embeddings._forward_hooks and not noisy.model.get_decoder()._forward_pre_hooks  # off after train()


# -----------------------------------------------------------------------------
# warnings before training, eval_generations

def test_advice():
    assert advice(load_config(None, []), 1) == []
    low = advice(load_config(None, ["training_config.learning_rate=5e-6"]), 1)
    assert len(low) == 1 and "5e-06" in low[0] and "usual LoRA range" in low[0]
    big = advice(load_config(None, ["training_config.per_device_train_batch_size=8",
                                    "training_config.gradient_accumulation_steps=4"]), 2)
    assert len(big) == 1 and "64" in big[0]
    assert advice(load_config(None, ["training_config.per_device_train_batch_size=8",
                                     "training_config.gradient_accumulation_steps=4"]), 1) == []
    dora = advice(load_config(None, ["peft_config.use_dora=true", "peft_config.lora_dropout=0.05"]), 1)
    assert len(dora) == 1 and "lora_dropout: 0" in dora[0]
    assert advice(load_config(None, ["peft_config.use_dora=true", "peft_config.lora_dropout=0"]), 1) == []


def test_eval_generations_at_every_evaluation(tmp_path, small_model_dir, small_data, capsys, helpers):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    cfg = helpers.make_cfg(out, small_model_dir, small_data, "training_config.eval_steps=2",
                           "training_config.eval_generations=2", "training_config.report_samples=2",
                           "training_config.learning_rate=5e-6")
    report = end_of_run(train(cfg), cfg)
    printed = capsys.readouterr().out
    assert printed.count("far below the usual LoRA range") == 1  # once, before training
    records = [r for r in read_metrics(out) if "generations" in r]
    assert [r["step"] for r in records] == [0, 2, 4]
    eval_lines = small_data[1].read_text().splitlines()[:2]
    for r in records:
        assert [set(g) for g in r["generations"]] == [{"prompt", "reference", "output"}] * 2
        for g, line in zip(r["generations"], eval_lines):
            messages = json.loads(line)["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            assert g["prompt"] == messages[:last] and g["reference"] == messages[last]["content"]
    # The same greedy replies as the report's: the base model's at step 0, the trained model's at the end.
    assert [g["output"] for g in records[0]["generations"]] == [s["base"] for s in report["samples"]]
    assert [g["output"] for g in records[-1]["generations"]] == [s["fine_tuned"] for s in report["samples"]]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert [e.step for e in events.Tensors("eval/generations/text_summary")] == [0, 2, 4]
    md = (out / "report.md").read_text()
    assert "## Answers during training (2 eval prompts" in md
    for step in (0, 2, 4):
        assert f"\n| {step} | " in md
