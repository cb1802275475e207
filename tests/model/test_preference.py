"""philora's preference objectives against TRL 1.16 itself: DPOTrainer (sigmoid, ipo), ORPOTrainer and
CPOTrainer(loss_type="simpo"), step-0 loss, metrics and LoRA gradients within 1e-5 relative.

How the comparison is made exact: TRL's collators are fed philora's own token ids (DPO's
DataCollatorForPreference takes prompt_ids / chosen_ids / rejected_ids; ORPO/CPO's
DPODataCollatorWithPadding takes chosen_/rejected_ input_ids, attention_mask and labels), and
``trainer.compute_loss`` runs on that batch; so both sides score the same sequences (philora's
tokenization cuts what follows the end-of-turn token, which TRL 1.16's DPO would keep, and does
not add ORPO/CPO's extra BOS/EOS: the test says nothing about tokenization, test_preference_data
does). The model: a tiny random Llama, LoRA r=4 on all seven projections with lora_B random (so
the policy differs from the reference); TRL wraps the base with PEFT (base + peft_config: its
reference is the adapter disabled = the base); philora loads the same adapter into its own
LoRA layers (model.inject.apply_adapter) and takes its reference from the base.
"""

import copy
import math
import os

import numpy as np
import pytest
import torch

from philora.data.preference import collate_pairs, encode_pair, to_pair
from philora.model.inject import apply_adapter
from philora.model.preference import PreferenceLoss, reference_logps

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
RTOL = 1e-5
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAIRS = [
    {"prompt": [{"role": "user", "content": "Sky color?"}],
     "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "It is green, I think."}]},
    {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}],
     "chosen": [{"role": "assistant", "content": "6"}],
     "rejected": [{"role": "assistant", "content": "six, obviously"}]},
    {"prompt": "Say hi", "chosen": "Hi there!", "rejected": "No."},
]


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE with no merges (a byte a token) and ChatML's special tokens: no hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def base_model(tok, attn="eager"):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).float().eval()
    model.config._attn_implementation = attn
    return model


@pytest.fixture(scope="module")
def encoded(tok):
    pairs = []
    for r in PAIRS:
        status, p = encode_pair(*to_pair(r), tok, max_length=1024)
        assert status == 0
        for side in ("chosen", "rejected"):  # labels: one run from the prompt's end to the last token
            assert p[f"{side}_mask"].tolist() == [0] * p["prompt_length"] + [1] * (len(p[side]) - p["prompt_length"])
        pairs.append(p)
    return pairs


def trl_trainer(kind, tok, base, tmp_path, **options):
    from datasets import Dataset
    from peft import LoraConfig
    common = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                  per_device_train_batch_size=3, max_steps=1, max_grad_norm=0.0, save_strategy="no",
                  disable_tqdm=True, dataloader_num_workers=0, max_length=1024)
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    data = Dataset.from_list([r for r in PAIRS if not isinstance(r["prompt"], str)])
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer
        return DPOTrainer(model=base, args=DPOConfig(**common, **options), train_dataset=data, processing_class=tok,
                          peft_config=peft)
    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        return ORPOTrainer(model=base, args=ORPOConfig(**common, **options), train_dataset=data,
                           processing_class=tok, peft_config=peft)
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    return CPOTrainer(model=base, args=CPOConfig(loss_type="simpo", **common, **options), train_dataset=data,
                      processing_class=tok, peft_config=peft)


def trl_batch(kind, trainer, pairs):
    """TRL's own collator on philora's ids."""
    rows = []
    for p in pairs:
        n = p["prompt_length"]
        if kind == "dpo":
            rows.append({"prompt_ids": p["chosen"][:n].tolist(), "chosen_ids": p["chosen"][n:].tolist(),
                         "rejected_ids": p["rejected"][n:].tolist()})
            continue
        row = {}
        for side in ("chosen", "rejected"):
            ids = p[side].tolist()
            row.update({f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                        f"{side}_labels": [-100] * n + ids[n:]})
        rows.append(row)
    return trainer.data_collator(rows)


def trl_metrics(kind, trainer):
    store = trainer._metrics["train"] if kind == "dpo" else trainer._stored_metrics["train"]
    return {k: float(v[-1]) for k, v in store.items()}


def lora_grads_peft(model):
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n and ".default." in n:
            module = n.split("base_model.model.", 1)[1].split(".lora_")[0]
            out[(module, "A" if ".lora_A." in n else "B")] = p.grad.detach().clone()
    return out


def lora_grads_philora(model):
    return {(n.rsplit(".", 1)[0], n[-1]): p.grad.detach().clone() for n, p in model.named_parameters()
            if n.endswith(("lora_A", "lora_B"))}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def randomize_b(model):
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.default." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def philora_side(kind, tok, pristine, trainer, pairs, tmp_path, packing, **options):
    """(loss, grads, metrics, model) of philora's PreferenceLoss on the adapter TRL trains."""
    trainer.model.save_pretrained(str(tmp_path / "adapter"))
    model = copy.deepcopy(pristine)
    model.requires_grad_(False)
    apply_adapter(model, tmp_path / "adapter")
    batch = collate_pairs(pairs, tok.pad_token_id, packing, 1024)
    if kind == "dpo":
        batch["ref_logps"] = reference_logps(pristine, batch)  # the base: TRL's adapter-disabled reference
    loss_fn = PreferenceLoss(model, kind, **options)
    loss_sum, n = loss_fn(batch)
    loss = loss_sum / n
    loss.backward()
    sums = loss_fn.take_metrics()
    metrics = {k: (v / sums["pairs"]).item() for k, v in sums.items() if k != "pairs"}
    return loss.item(), lora_grads_philora(model), metrics, model


CASES = [
    ("dpo", dict(beta=0.1, loss_type=["sigmoid"]), dict(beta=0.1, loss_type="sigmoid")),
    ("dpo", dict(beta=0.1, loss_type=["ipo"]), dict(beta=0.1, loss_type="ipo")),
    ("orpo", dict(beta=0.1), dict(beta=0.1)),
    ("simpo", dict(beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0), dict(beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)),
    ("simpo", dict(beta=2.0, simpo_gamma=0.5, cpo_alpha=1.0, label_smoothing=0.1),
     dict(beta=2.0, simpo_gamma=0.5, cpo_alpha=1.0, label_smoothing=0.1)),
]


@pytest.mark.parametrize("kind, trl_options, options", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_step0_equals_trl(kind, trl_options, options, tok, encoded, tmp_path):
    base = base_model(tok)
    pristine = copy.deepcopy(base)
    trainer = trl_trainer(kind, tok, base, tmp_path, **trl_options)
    randomize_b(trainer.model)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trl_batch(kind, trainer, encoded))
    trl_loss.backward()
    want = lora_grads_peft(trainer.model)
    got_m = trl_metrics(kind, trainer)
    loss, grads, metrics, _ = philora_side(kind, tok, pristine, trainer, encoded, tmp_path, packing=True, **options)
    assert abs(loss - trl_loss.item()) <= RTOL * abs(trl_loss.item()), (loss, trl_loss.item())
    assert set(grads) == set(want) and len(want) == 2 * 7 * 2
    worst = max(rel(grads[k], want[k]) for k in want)
    print(f"\n{kind} {options}: trl {trl_loss.item():.8f} philora {loss:.8f} worst grad rel {worst:.1e}")
    assert worst < RTOL, worst
    for k, v in metrics.items():  # TRL's names, TRL's values
        assert abs(v - got_m[k]) <= 1e-5 * max(1.0, abs(got_m[k])), (k, v, got_m[k])
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(metrics)


@pytest.mark.parametrize("kind, options", [("dpo", dict(beta=0.1)), ("orpo", dict(beta=0.1)),
                                           ("simpo", dict(beta=2.0, cpo_alpha=1.0))])
def test_packed_equals_unpacked(kind, options, tok, encoded):
    from philora.core.config import PeftConfig
    from philora.model.inject import inject_lora
    results = []
    for packing in (True, False):
        model = base_model(tok, attn="sdpa")
        model.requires_grad_(False)
        inject_lora(model, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        batch = collate_pairs(encoded, tok.pad_token_id, packing, 64)
        assert (batch["input_ids"].shape[0] < 6) == packing
        batch["ref_logps"] = torch.tensor([[-50.0, -60.0]] * 3, dtype=torch.float64)
        loss_sum, n = PreferenceLoss(model, kind, **options)(batch)
        loss_sum.backward()
        results.append((loss_sum.item(), lora_grads_philora(model)))
    (a, ga), (b, gb) = results
    assert abs(a - b) <= RTOL * abs(b)
    assert max(rel(ga[k], gb[k]) for k in gb) < RTOL


def test_dpo_step0_is_ln2_with_the_adapter_at_zero(tok, encoded):
    """The reference is the step-0 model: a fresh adapter (B = 0), or any starting adapter."""
    from philora.core.config import PeftConfig
    from philora.model.inject import inject_lora
    model = base_model(tok, attn="sdpa")
    model.requires_grad_(False)
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
    batch = collate_pairs(encoded, tok.pad_token_id, True, 1024)
    model.eval()
    batch["ref_logps"] = reference_logps(model, batch)
    model.train()  # dropout on LoRA's input changes nothing while B is zero
    loss_fn = PreferenceLoss(model, "dpo", beta=0.1)
    loss_sum, n = loss_fn(batch)
    assert abs(loss_sum.item() / n.item() - math.log(2)) < 1e-6
    m = loss_fn.take_metrics()
    assert m["rewards/accuracies"].item() == 0 and abs(m["rewards/margins"].item()) < 1e-6
    loss_sum.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n_, p in model.named_parameters() if "lora_" in n_)
    assert np.isfinite(batch["ref_logps"].numpy()).all() and (batch["ref_logps"] < 0).all()


@pytest.mark.parametrize("overrides, needles", [
    (["training_config.objective=dpo", "training_config.beta=0"], ["'training_config.beta' must be > 0", "0.0"]),
    (["training_config.objective=orpo", "training_config.beta=-1"], ["'training_config.beta' must be > 0"]),
    (["training_config.objective=kto"], ["'training_config.objective' must be one of", "'dpo'"]),
    (["training_config.objective=orpo", "training_config.loss_type=ipo"],
     ["'training_config.loss_type' applies to training_config.objective dpo only", "orpo"]),
    (["training_config.objective=dpo", "training_config.label_smoothing=0.1"],
     ["'training_config.label_smoothing' applies to training_config.objective simpo only"]),
    (["training_config.objective=simpo", "training_config.label_smoothing=0.5"],
     ["'training_config.label_smoothing' must be in [0, 0.5)"]),
    (["training_config.objective=simpo", "training_config.cpo_alpha=-1"], ["'training_config.cpo_alpha' must be >= 0"]),
    (["training_config.objective=dpo", "training_config.dpo_beta=0.1"], ["unknown key 'training_config.dpo_beta'"]),
])
def test_bad_config_is_one_line(overrides, needles):
    from conftest import one_line_error
    from philora.core.config import ConfigError, load_config
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    one_line_error(e, *needles)


def test_config_keys_and_init_adapter_checks(tmp_path):
    from conftest import one_line_error
    from philora.core.config import load_config
    from philora.core.errors import PhiloraError
    from philora.model.preference import check_start
    cfg = load_config(None, ["training_config.objective=simpo", "training_config.beta=2.5", "training_config.cpo_alpha=0",
                             "training_config.simpo_gamma=1.2", "training_config.label_smoothing=0.1"])
    tc = cfg.training_config
    assert (tc.objective, tc.beta, tc.cpo_alpha, tc.simpo_gamma, tc.label_smoothing) == ("simpo", 2.5, 0.0, 1.2, 0.1)
    assert check_start(cfg) is None
    missing = load_config(None, ["training_config.objective=dpo", f"peft_config.init_adapter={tmp_path / 'nope'}"])
    with pytest.raises(PhiloraError) as e:
        check_start(missing)
    one_line_error(e, "peft_config.init_adapter", "no such directory", "DPO's reference is the step-0 model")
    (tmp_path / "run" / "checkpoint-10").mkdir(parents=True)
    unfinished = load_config(None, ["training_config.objective=dpo", f"peft_config.init_adapter={tmp_path / 'run'}"])
    with pytest.raises(PhiloraError) as e:
        check_start(unfinished)
    one_line_error(e, "has not saved its adapter yet", "--resume")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PhiloraError) as e:
        check_start(load_config(None, [f"peft_config.init_adapter={tmp_path / 'empty'}"]))
    one_line_error(e, "no adapter_config.json", "training starts from it")


def test_reference_table_is_stored_and_checked(tok, encoded, tmp_path):
    """Reference log-probs computed once (eval mode, batched and packed) equal the model's own per-pair
    values, survive the run directory, and a resume on other pairs is refused in one line."""
    from conftest import one_line_error
    from philora.core.errors import PhiloraError
    from philora.model.preference_ref import load_reference, reference_table, save_reference, with_reference
    model = base_model(tok, attn="sdpa")
    table = reference_table(model, encoded, tok.pad_token_id, True, 64, 2, torch.device("cpu"))
    for k, p in enumerate(encoded):  # one pair at a time, unpacked
        one = reference_logps(model, collate_pairs([p], tok.pad_token_id, False, 64))
        assert torch.allclose(table[k], one[0], rtol=1e-6)
    half = reference_table(model, encoded, tok.pad_token_id, True, 64, 2, torch.device("cpu"), indices=[1])
    assert half[0].abs().sum() == 0 and torch.equal(half[1], table[1])
    assert load_reference(tmp_path, {"train": encoded}) is None
    save_reference(tmp_path, {"train": table, "eval": table[:1]}, {"train": encoded, "eval": encoded[:1]})
    back = load_reference(tmp_path, {"train": encoded, "eval": encoded[:1]})
    assert torch.equal(back["train"], table) and torch.equal(back["eval"], table[:1])
    with pytest.raises(PhiloraError) as e:
        load_reference(tmp_path, {"train": encoded[::-1]})
    one_line_error(e, "reference_logps.safetensors", "other train pairs")
    batch = collate_pairs(with_reference(encoded, table), tok.pad_token_id, True, 64)
    assert torch.equal(batch["ref_logps"], table)


def test_sft_then_dpo_on_one_adapter(tok, encoded, tmp_path):
    """init_adapter: the LoRA starts from a saved adapter (its own ranks), the reference is that
    model, so step-0 DPO is ln 2 as with TRL's pre-wrapped PeftModel (its frozen "ref" copy); the
    run's adapter saves and peft loads it back with the trained values."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from philora.core.config import PeftConfig
    from philora.model.adapter import save_adapter
    from philora.model.preference_ref import reference_table, start_adapter, with_reference
    sft = get_peft_model(base_model(tok), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_b(sft)
    sft.save_pretrained(str(tmp_path / "sft"))
    model = base_model(tok, attn="sdpa")
    model.requires_grad_(False)
    start_adapter(model, tmp_path / "sft", lora_dropout=0.1)
    assert all(isinstance(m.lora_dropout, torch.nn.Dropout) for m in model.modules() if hasattr(m, "lora_A"))
    ids = torch.tensor([encoded[0]["chosen"].tolist()])
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, sft.eval()(ids).logits, atol=1e-5)
    table = reference_table(model, encoded, tok.pad_token_id, True, 1024, 8, torch.device("cpu"))
    batch = collate_pairs(with_reference(encoded, table), tok.pad_token_id, True, 1024)
    model.eval()  # TRL disables dropout; here: eval mode for the exact step-0 value
    loss_sum, n = PreferenceLoss(model, "dpo", beta=0.1)(batch)
    assert abs(loss_sum.item() / n.item() - math.log(2)) < 1e-6
    loss_sum.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    save_adapter(model, tmp_path / "dpo", "unused", PeftConfig(r=16, lora_alpha=32))
    back = PeftModel.from_pretrained(base_model(tok), str(tmp_path / "dpo")).eval()
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, model(ids).logits, atol=1e-5)
        assert not torch.allclose(back(ids).logits, sft(ids).logits, atol=1e-4)


def test_preference_accuracy_against_full_logits(tok, encoded):
    """The report's reference-free accuracy: mean completion log-prob of chosen above rejected, per
    pair, as the model's full logits give it one sequence at a time."""
    from philora.model.preference_ref import preference_accuracy
    model = base_model(tok, attn="sdpa")
    got = preference_accuracy(model, encoded, tok.pad_token_id, True, 64, 2, torch.device("cpu"))
    wins, gap = 0, 0.0
    with torch.no_grad():
        for p in encoded:
            mean = []
            for side in ("chosen", "rejected"):
                ids = torch.tensor([p[side].tolist()])
                lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
                mask = torch.tensor(p[f"{side}_mask"][1:], dtype=torch.bool)
                mean.append(lp[mask].mean().item())
            wins += mean[0] > mean[1]
            gap += mean[0] - mean[1]
    assert got["preference_accuracy"] == wins / len(encoded)
    assert abs(got["logp_margin"] - gap / len(encoded)) < 1e-5
