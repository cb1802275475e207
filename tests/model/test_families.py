"""The model matrix: every Phi and the open models paired with it, computed exactly.

For each family a tiny random model with that family's distinctive config (sliding window,
LongRoPE factors, GQA, partial rotary, tied embeddings, softcapping, qkv bias) and an offline
tokenizer with its chat template and special tokens. Attention is made sharp (q and k scaled up):
random init gives near-uniform attention, which hides position and window bugs. Checked against
transformers' eager model (with peft's LoRA) run on each conversation alone:

- labels are exactly each assistant turn's content plus its end-of-turn token;
- philora's packed (and padded) loss and LoRA gradients, through philora's own loading (attention
  chosen for the model, LongRoPE per conversation), with conversations straddling the sliding
  window and the LongRoPE switch;
- peft loads philora's adapter (per-slice on Phi-3's fused modules, with the GQA sizes) and its
  logits equal ``philora merge``'s model; tied embeddings stay tied;
- generation stops at the family's end-of-turn token.
"""

import json
from pathlib import Path

import pytest
import torch

from philora.data.batching import collate
from philora.core.config import ModelConfig, PeftConfig
from philora.data.build import encode_chat
from philora.model.inject import inject_lora
from philora.model.loading import load_model_and_tokenizer
from philora.data.encoding import IGNORE_INDEX
from philora.model.loss import CausalLMLoss
from philora.model.families import stop_token_ids

# tests/fixtures (the families fixture reads the same file; the names are needed at collection)
FAMILIES = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "families.json").read_text(
    encoding="utf-8"))["families"]
SWITCH = 48  # LongRoPE's original_max_position_embeddings in the LongRoPE families


def examples(tok, convs):
    return [dict(encode_chat(c, tok), messages=c) for c in convs]


def tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def eager(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def philora_lora(path, pc, seed=5):
    """The model as philora trains it (its loading, attention choice and LongRoPE handling) with LoRA
    per ``pc`` and non-zero random B factors."""
    model, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=path, dtype="float32"), torch.device("cpu"))
    inject_lora(model, pc)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def lora_params(model):
    """{module name: {"lora_A"|"lora_B": parameter}} of philora's or peft's LoRA layers."""
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            n = n.removeprefix("base_model.model.").replace(".default.weight", "")
            module, _, kind = n.rpartition(".")
            out.setdefault(module, {})[kind] = p
    return out


def peft_twin(path, philora_model, pc):
    """transformers' eager model of ``path`` with peft's LoRA on the same modules, same factors."""
    from peft import LoraConfig, get_peft_model
    ours = lora_params(philora_model)
    ref = get_peft_model(eager(path), LoraConfig(r=pc.r, lora_alpha=pc.lora_alpha, lora_dropout=0.0,
                                                 target_modules=sorted(ours)))
    theirs = lora_params(ref)
    assert sorted(theirs) == sorted(ours)
    with torch.no_grad():
        for module, factors in ours.items():
            for kind, p in factors.items():
                theirs[module][kind].copy_(p)
    return ref


def alone(ref, exs):
    """Sum of token losses of each conversation run alone through ``ref`` (transformers computes the
    loss), backward included; returns the total."""
    total = 0.0
    for ex in exs:
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        loss = ref(input_ids=ids, labels=labels).loss * n
        loss.backward()
        total += loss.item()
    return total


def worst(a, b):
    return max((x - y).abs().max().item() / max(y.abs().max().item(), 1e-12) for x, y in zip(a, b))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_labels_are_each_assistant_turn_and_its_end_of_turn(name, families):
    tok = tokenizer(families.dir(name))
    eot = tok.convert_tokens_to_ids(FAMILIES[name]["end_of_turn"])
    for conv in families.conversations(name):
        ex = encode_chat(conv, tok)
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids == list(tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
        runs, run = [], []
        for t, lab in zip(ids, labels):
            if lab != IGNORE_INDEX:
                assert lab == t
                run.append(t)
            elif run:
                runs, run = runs + [run], []
        runs += [run] if run else []
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        assert len(runs) == len(replies)
        for run, reply in zip(runs, replies):
            assert run[-1] == eot and eot not in run[:-1]
            assert tok.decode(run[:-1]).strip() == reply.strip()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_training_loss_and_lora_grads_equal_eager_alone(name, families, capsys, monkeypatch):
    """Packed and padded batches through philora (its attention, LongRoPE per conversation, chunked
    loss) against transformers' eager model + peft on each conversation alone."""
    path = families.dir(name)
    tok = tokenizer(path)
    exs = examples(tok, families.conversations(name))
    pc = PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    model = philora_lora(path, pc)
    ref = peft_twin(path, model, pc)
    expected = alone(ref, exs)
    theirs = {m: {k: p.grad for k, p in f.items()} for m, f in lora_params(ref).items()}
    config = ref.base_model.model.config
    lengths = [len(ex["input_ids"]) for ex in exs]
    window = getattr(config, "sliding_window", None)
    if window and window < 1000:  # conversations on both sides of the window, which matters
        assert min(lengths) <= window < max(lengths)
    if "longrope" in str(getattr(config, "rope_parameters", "")):
        assert min(lengths) <= SWITCH < max(lengths)
    for packing in (True, False):
        model.zero_grad()
        batch = collate(exs, tok.pad_token_id, packing, 4 * max(lengths))
        if packing:
            assert batch["input_ids"].shape[0] < len(exs)
        total, n = CausalLMLoss(model)(batch)
        total.backward()
        assert int(n) == sum(sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX) for ex in exs)
        assert abs(total.item() - expected) <= 1e-5 * abs(expected), (packing, total.item(), expected)
        ours = lora_params(model)
        for module, grads in theirs.items():
            for kind, g in grads.items():
                # within 1e-4 of the gradient's scale: fp32 summation order, sharpened by the attention
                torch.testing.assert_close(ours[module][kind].grad, g, rtol=1e-4, atol=1e-4 * g.abs().max().item())
    if name.startswith("gemma2"):  # softcapped attention: said once, at load
        assert capsys.readouterr().out.count("philora_softcap") == 1


def peft_config_for(name):
    """Per-slice LoRA on Phi-3's fused modules (the GQA sizes of q/k/v), all-linear elsewhere."""
    if FAMILIES[name]["model_class"] == "Phi3ForCausalLM":
        return PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["o_proj", "down_proj"],
                          fused_slices={"qkv_proj": ["q", "v"], "gate_up_proj": ["up"]})
    return PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_peft_loads_the_adapter_and_equals_merge(name, families, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    from philora.model.adapter import save_adapter
    from philora.use.merge import merge
    path = families.dir(name)
    tok = tokenizer(path)
    pc = peft_config_for(name)
    model = philora_lora(path, pc).eval()
    save_adapter(model, tmp_path / "run", path, pc)
    merge(tmp_path / "run", tmp_path / "merged")
    merged = eager(tmp_path / "merged")
    served = PeftModel.from_pretrained(eager(path), tmp_path / "run").eval()
    longest = max(examples(tok, families.conversations(name)), key=lambda e: len(e["input_ids"]))
    ids = torch.tensor([longest["input_ids"]])
    with torch.no_grad():
        trained, by_peft, by_merge = (m(input_ids=ids).logits for m in (model, served, merged))
    torch.testing.assert_close(by_peft, trained, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by_merge, by_peft, rtol=1e-4, atol=1e-4)
    assert (by_peft - eager(path)(input_ids=ids).logits).abs().max() > 1e-2  # the adapter does something
    tied = FAMILIES[name]["config"]["tie_word_embeddings"]
    assert merged.config.tie_word_embeddings == tied
    if tied:  # one tensor in the merged model and one on disk
        assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
        with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if k.startswith("lm_head")]
    eot = tok.convert_tokens_to_ids(FAMILIES[name]["end_of_turn"])
    assert eot in json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_generation_stops_at_the_end_of_turn(name, families):
    """The template's end-of-turn token stops generation, even where the generation config names
    only the tokenizer's eos (as the tiny models here do)."""
    from transformers import GenerationConfig
    path = families.dir(name)
    tok, model = tokenizer(path), eager(path)
    eot = tok.convert_tokens_to_ids(FAMILIES[name]["end_of_turn"])
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id)
    assert eot in stop_token_ids(model, tok)
