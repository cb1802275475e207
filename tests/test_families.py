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

import copy
import json
import random
import shutil
import string
from pathlib import Path

import pytest
import torch

from philora.batching import collate
from philora.config import ModelConfig, PeftConfig
from philora.data import encode_chat
from philora.inject import inject_lora
from philora.loading import load_model_and_tokenizer
from philora.loss import IGNORE_INDEX, CausalLMLoss
from philora.models import stop_token_ids

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARP = 16.0  # q and k weights scaled by this: attention logits x256 (mean top attention weight ~0.75)
WINDOW, SWITCH = 24, 48  # sliding window (tokens) and LongRoPE's original_max_position_embeddings

PHI3_TEMPLATE = (FIXTURES / "phi3-tokenizer" / "chat_template.jinja").read_text(encoding="utf-8")
PHI35_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
    "'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You "
    "are a helpful assistant.<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if "
    "(message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == "
    "\"assistant\") %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


def longrope(half):
    """LongRoPE factors for ``half`` rotary frequency pairs: distinct short and long sets."""
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [2.0 + 0.5 * i for i in range(half)]}


PHI3 = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
FAMILIES = {  # name: (config class, model class, config kwargs, tokenizer, end of turn, system role?)
    "phi3-mini-4k": ("Phi3Config", "Phi3ForCausalLM", dict(
        PHI3, num_key_value_heads=4, vocab_size=32064, sliding_window=WINDOW, max_position_embeddings=512,
        original_max_position_embeddings=512, tie_word_embeddings=False), ("phi3", PHI3_TEMPLATE), "<|end|>", True),
    "phi3.5-mini": ("Phi3Config", "Phi3ForCausalLM", dict(
        PHI3, num_key_value_heads=4, vocab_size=32064, sliding_window=262144, max_position_embeddings=4 * SWITCH,
        original_max_position_embeddings=SWITCH, rope_scaling=longrope(8), tie_word_embeddings=False),
        ("phi3", PHI35_TEMPLATE), "<|end|>", True),
    "phi4-mini": ("Phi3Config", "Phi3ForCausalLM", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        vocab_size=200064, partial_rotary_factor=0.75, max_position_embeddings=4 * SWITCH, sliding_window=262144,
        original_max_position_embeddings=SWITCH, rope_scaling=longrope(3), tie_word_embeddings=True),
        ("phi4-mini", PHI4_MINI_TEMPLATE), "<|end|>", True),
    "phi4": ("Phi3Config", "Phi3ForCausalLM", dict(
        PHI3, num_key_value_heads=1, vocab_size=100352, rope_theta=250000.0, max_position_embeddings=16384,
        original_max_position_embeddings=16384, sliding_window=None, tie_word_embeddings=False),
        ("phi4", PHI4_TEMPLATE), "<|im_end|>", True),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        SMALL, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}), ("llama3", LLAMA3_TEMPLATE), "<|eot_id|>", True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, tie_word_embeddings=True),
              ("qwen2", QWEN2_TEMPLATE), "<|im_end|>", True),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, sliding_window=WINDOW, tie_word_embeddings=False),
                ("mistral", MISTRAL_TEMPLATE), "</s>", False),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        SMALL, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16, tie_word_embeddings=True),
        ("gemma", GEMMA_TEMPLATE), "<end_of_turn>", False),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        SMALL, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"]), ("gemma", GEMMA_TEMPLATE), "<end_of_turn>", False),
}
# tokenizer kind: (special tokens, bos, eos, pad, byte-level?)
TOKENIZERS = {
    "phi4-mini": (["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>", "<|tool|>", "<|/tool|>",
                   "<|tool_call|>", "<|/tool_call|>"], "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", True),
    "phi4": (["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", True),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", True),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", True),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>", False),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>", False),
}
WORDS = ("the quick brown fox jumps over a lazy dog while seven small cats watch from the warm kitchen "
         "window and count every bird that flies past the old stone bridge near our river town").split()


def build_tokenizer(kind, template, out):
    """A family's tokenizer, offline: Phi-3's real one, or a small BPE with the family's special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    if kind == "phi3":
        shutil.copytree(FIXTURES / "phi3-tokenizer", out, dirs_exist_ok=True)
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
        return
    specials, bos, eos, pad, byte_level = TOKENIZERS[kind]
    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>", byte_fallback=not byte_level))
    if byte_level:  # tiktoken-like (Llama 3, Qwen, Phi-4)
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-like (Mistral, Gemma)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = list(string.printable.strip()) + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False,
                                  special_tokens=["<unk>"] if not byte_level else [])
    tok.train_from_iterator([" ".join(WORDS)] * 4 + ["Hello! What is 17 plus 25? Yes, no."], trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=template, clean_up_tokenization_spaces=False)
    fast.save_pretrained(out)


def sharpen(model, factor=SHARP):
    """Scale every attention's queries and keys by ``factor`` (q/k projections, Phi-3's fused q and k
    rows, or the q/k norms of qk-normed models), in place."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "q_norm") and hasattr(m, "k_norm"):  # Gemma 3: (1 + weight) scales q and k
                for norm in (m.q_norm, m.k_norm):
                    norm.weight.copy_((1 + norm.weight) * factor ** 0.5 - 1)  # q, k already unit-RMS
            elif hasattr(m, "qkv_proj"):
                rows = (m.config.num_attention_heads + m.num_key_value_heads) * m.head_dim
                m.qkv_proj.weight[:rows] *= factor
            elif hasattr(m, "q_proj") and hasattr(m, "k_proj"):
                for p in (m.q_proj, m.k_proj):
                    p.weight.mul_(factor)
                    if p.bias is not None:
                        p.bias.mul_(factor)


def build_family(name, out):
    """(model directory, family entry): tokenizer and a sharp random model saved to ``out``."""
    import transformers
    from transformers import AutoTokenizer, GenerationConfig
    config_cls, model_cls, kwargs, (kind, template), eot, _ = FAMILIES[name]
    build_tokenizer(kind, template, out)
    tok = AutoTokenizer.from_pretrained(out)
    kwargs = dict(kwargs)
    kwargs.setdefault("vocab_size", -(-len(tok) // 64) * 64)
    config = getattr(transformers, config_cls)(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(config).float()
    sharpen(model)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(name.replace(".", "_")))
        return built[name]
    return get


def conversations(system=True, seed=0):
    """Six conversations, 1 to 3 turns, from a couple of tokens to ~140: some within the sliding
    window, some past it, some on each side of the LongRoPE switch."""
    rng = random.Random(seed)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."
    convs = [
        [("user", "Hi"), ("assistant", "Hello!")],
        [("system", text(6)), ("user", text(8)), ("assistant", text(10))],
        [("user", text(3)), ("assistant", text(4)), ("user", text(5)), ("assistant", text(30))],
        [("user", text(20)), ("assistant", text(45))],
        [("system", text(4)), ("user", text(2)), ("assistant", text(70))],
        [("user", "What is 17 plus 25?"), ("assistant", "42")],
    ]
    return [[{"role": r, "content": c} for r, c in conv if system or r != "system"] for conv in convs]


def examples(tok, system):
    return [dict(encode_chat(c, tok), messages=c) for c in conversations(system)]


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
def test_labels_are_each_assistant_turn_and_its_end_of_turn(name, family_dir):
    tok = tokenizer(family_dir(name))
    eot = tok.convert_tokens_to_ids(FAMILIES[name][4])
    for conv in conversations(FAMILIES[name][5]):
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
def test_training_loss_and_lora_grads_equal_eager_alone(name, family_dir, capsys):
    """Packed and padded batches through philora (its attention, LongRoPE per conversation, chunked
    loss) against transformers' eager model + peft on each conversation alone."""
    path = family_dir(name)
    tok = tokenizer(path)
    exs = examples(tok, FAMILIES[name][5])
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
                torch.testing.assert_close(ours[module][kind].grad, g, rtol=1e-4, atol=1e-5 * g.abs().max().item())
    if name.startswith("gemma2"):  # softcapped attention: said once, at load
        assert capsys.readouterr().out.count("philora_softcap") == 1


def peft_config_for(name):
    """Per-slice LoRA on Phi-3's fused modules (the GQA sizes of q/k/v), all-linear elsewhere."""
    if FAMILIES[name][1] == "Phi3ForCausalLM":
        return PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["o_proj", "down_proj"],
                          fused_slices={"qkv_proj": ["q", "v"], "gate_up_proj": ["up"]})
    return PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_peft_loads_the_adapter_and_equals_merge(name, family_dir, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    from philora.adapter import save_adapter
    from philora.merge import merge
    path = family_dir(name)
    tok = tokenizer(path)
    pc = peft_config_for(name)
    model = philora_lora(path, pc).eval()
    save_adapter(model, tmp_path / "run", path, pc)
    merge(tmp_path / "run", tmp_path / "merged")
    merged = eager(tmp_path / "merged")
    served = PeftModel.from_pretrained(eager(path), tmp_path / "run").eval()
    ids = torch.tensor([max(examples(tok, FAMILIES[name][5]), key=lambda e: len(e["input_ids"]))["input_ids"]])
    with torch.no_grad():
        trained, by_peft, by_merge = (m(input_ids=ids).logits for m in (model, served, merged))
    torch.testing.assert_close(by_peft, trained, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by_merge, by_peft, rtol=1e-4, atol=1e-4)
    assert (by_peft - eager(path)(input_ids=ids).logits).abs().max() > 1e-2  # the adapter does something
    tied = FAMILIES[name][2]["tie_word_embeddings"]
    assert merged.config.tie_word_embeddings == tied
    if tied:  # one tensor in the merged model and one on disk
        assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
        with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if k.startswith("lm_head")]
    eot = tok.convert_tokens_to_ids(FAMILIES[name][4])
    assert eot in json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_generation_stops_at_the_end_of_turn(name, family_dir):
    """The template's end-of-turn token stops generation, even where the generation config names
    only the tokenizer's eos (as the tiny models here do)."""
    from transformers import GenerationConfig
    path = family_dir(name)
    tok, model = tokenizer(path), eager(path)
    eot = tok.convert_tokens_to_ids(FAMILIES[name][4])
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id)
    assert eot in stop_token_ids(model, tok)
