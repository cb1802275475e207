"""The ``philora`` command: a thin argparse layer over the Python API.

Each sub-command parses its arguments and calls one function; user mistakes (PhiloraError)
print one line, ``philora: error: ...``, and exit 2 with no traceback. Outputs are checked here,
once for every command (``core/diskio.guard_output``): an existing one is replaced only with --force.
"""

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

from .core.diskio import HINTS, guard_output
from .core.errors import PhiloraError

BENCH = Path(__file__).resolve().parents[2] / "bench" / "run.py"  # in a source checkout
TOOLS_SHAPE_HELP = ("for a template that reads tools from the system message (Phi-4-mini): how the training data gave "
                    "them, [{name, description, parameters}] (flat) or [{type, function}] (default: the run's data's)")


def describe_os_error(e: OSError) -> str:
    """'FILE: reason' for an OSError that reached the top (a write, or a read of a user's file)."""
    text = str(e).strip()
    reason = e.strerror or (text.splitlines()[0] if text else type(e).__name__)
    if e.errno in HINTS:
        reason += f" ({HINTS[e.errno]})"
    names = " -> ".join(f"'{f}'" for f in (e.filename, e.filename2) if f)
    return f"{names}: {reason}" if names else reason


def _number(kind: type, ok: Callable, what: str):
    """An argparse type: ``kind`` values for which ``ok`` holds, else 'must be WHAT'."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system message to start the conversation")
    p.add_argument("--temperature", type=_number(float, lambda v: v >= 0, ">= 0"), default=0.7,
                   help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=_number(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=0.9)
    p.add_argument("--max-new-tokens", type=_number(int, lambda v: v >= 1, ">= 1"), default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None, help="base model for an adapter (default: the adapter's own)")



def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="philora", description="Fine-tune Phi-3 (and other causal LMs) with LoRA on chat data.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune with LoRA (no CONFIG: the built-in tiny default, offline)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training_config.max_steps=20")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace philora's files in an existing output_dir")

    p = sub.add_parser("merge", help="merge an adapter into its base model: a plain HF model directory")
    p.add_argument("source", help="a philora run directory or any PEFT LoRA adapter directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default=None, help="output dtype (default: the base model's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")

    p = sub.add_parser("generate", help="generate replies: base + adapter, or a merged model")
    p.add_argument("source", help="run/adapter directory, merged model directory, or model name")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="one user message")
    g.add_argument("--prompts", help="JSONL file: {\"prompt\": ...} or {\"messages\": [...]} per line")
    p.add_argument("--out", default=None, help="JSONL output for --prompts (default: stdout)")
    p.add_argument("--no-stream", action="store_true", help="print the reply at the end, not token by token")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    _sampling(p)

    p = sub.add_parser("chat", help="interactive chat with a fine-tuned model")
    p.add_argument("source", help="run/adapter directory, merged model directory, or model name")
    _sampling(p)

    p = sub.add_parser("eval", help="base vs fine-tuned: loss, perplexity, generations, report.md")
    p.add_argument("run", help="a philora run directory (or PEFT adapter directory)")
    p.add_argument("--data", default=None, help="eval data file (default: the run's eval split)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--samples", type=_number(int, lambda v: v >= 0, ">= 0"), default=8,
                   help="held-out prompts to generate for")
    p.add_argument("--max-new-tokens", type=_number(int, lambda v: v >= 1, ">= 1"), default=128)
    p.add_argument("--force", action="store_true", help="overwrite an existing report directory")

    p = sub.add_parser("adapter", help="check or convert LoRA adapters")
    asub = p.add_subparsers(dest="adapter_command", metavar="ACTION")
    q = asub.add_parser("check", help="check an adapter against what serving engines (vLLM) accept")
    q.add_argument("adapter", help="PEFT adapter directory")
    q.add_argument("--base", default=None, help="base model to check module names and shapes against")
    q = asub.add_parser("convert", help="convert between loralib checkpoints and PEFT adapters")
    q.add_argument("source", help="loralib .pt/.safetensors file, or a PEFT adapter directory")
    q.add_argument("--out", required=True, help="PEFT adapter directory, or a loralib .safetensors file")
    q.add_argument("--to", choices=["peft", "loralib"], required=True)
    q.add_argument("--r", type=_number(int, lambda v: v >= 1, ">= 1"), default=None,
                   help="LoRA rank (loralib does not store it)")
    q.add_argument("--lora-alpha", type=_number(float, lambda v: v > 0, "> 0"), default=None,
                   help="LoRA alpha (loralib does not store it)")
    q.add_argument("--base", default=None, help="base model name or path the adapter is for")
    q.add_argument("--enable-lora", action="append", default=[], metavar="MODULE=1,0,1",
                   help="enabled slices of a fused module (loralib does not store them), repeatable")
    q.add_argument("--force", action="store_true")

    p = sub.add_parser("data", help="check a config's data before training (tokenizer only, no model)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    q = dsub.add_parser("check", help="records, bad records, lengths, duplicates, steps per epoch; exit 1 on bad records")
    q.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in tiny.yaml)")
    q.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.max_length=1024")
    q.add_argument("--json", action="store_true", help="one JSON object on stdout instead of text")
    q.add_argument("--out", default=None, help="directory for data_check.json and lengths.png (a histogram)")
    q.add_argument("--force", action="store_true", help="overwrite an existing --out directory")
    q.add_argument("--processes", type=_number(int, lambda v: v >= 1, ">= 1"), default=1,
                   help="training processes (torchrun), for the steps per epoch (default 1)")

    p = sub.add_parser("export", help="export for serving (GGUF + Ollama Modelfile, a vLLM tool parser)")
    esub = p.add_subparsers(dest="export_format", metavar="FORMAT")
    q = esub.add_parser("gguf", help="a GGUF file for llama.cpp / Ollama / LM Studio, with an Ollama Modelfile beside it")
    q.add_argument("source", help="a philora run or PEFT adapter directory (merged in float32 on the way), or a model directory")
    q.add_argument("--out", required=True, help="the .gguf file to write (the Modelfile goes beside it)")
    q.add_argument("--outtype", default="f16",
                   help="f32, f16 (default), bf16, q8_0; q4_k_m, q5_k_m, q6_k, ... with llama-cpp-python installed")
    q.add_argument("--adapter-only", action="store_true", help="the LoRA alone as a GGUF adapter (llama.cpp --lora, Ollama ADAPTER)")
    q.add_argument("--base", default=None, help="base model for an adapter (default: the run's / adapter's own)")
    q.add_argument("--tools-shape", choices=("flat", "openai"), default=None, help=TOOLS_SHAPE_HELP)
    q.add_argument("--force", action="store_true", help="overwrite an existing output file and Modelfile")
    q = esub.add_parser("tool-parser", help="a vLLM tool-parser plugin that reads the tool calls the model was "
                                            "trained to write (Phi-4-mini), and the vllm serve line")
    q.add_argument("source", help="a philora run or PEFT adapter directory")
    q.add_argument("--out", default=None, help="the plugin file to write (default: SOURCE/philora_tool_parser.py)")
    q.add_argument("--tools-shape", choices=("flat", "openai"), default=None, help=TOOLS_SHAPE_HELP)
    q.add_argument("--force", action="store_true", help="overwrite an existing plugin file and chat template")

    sub.add_parser("verify", help="the run's held-out prompts in peft, the merged model, GGUF (llama.cpp), vLLM: "
                                  "the same greedy tokens? exit 1 if not (philora verify --help)")
    sub.add_parser("bench", help="benchmark philora against TRL + PEFT (philora bench --help)")
    return ap


def _config_args(args: argparse.Namespace):
    """(config path or None, overrides): a first positional with "=" that is no file is an override."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():  # only overrides were given
        config, overrides = None, [config] + overrides
    return config, overrides


def _enable_lora(items: List[str]) -> Optional[dict]:
    """["qkv_proj=1,0,1"] -> {"qkv_proj": [True, False, True]}."""
    out = {}
    for item in items:
        name, _, flags = item.partition("=")
        bits = [f.strip().lower() for f in flags.split(",")]
        if not name or not flags or any(b not in ("1", "0", "true", "false") for b in bits):
            raise PhiloraError(f"--enable-lora '{item}' must look like MODULE=1,0,1")
        out[name] = [b in ("1", "true") for b in bits]
    return out or None


def _with_allocator() -> None:
    """Re-execute this ``philora train`` process with TCMalloc preloaded, when allocator.py
    finds it (lower peak memory, same speed); a bad PHILORA_MALLOC is a one-line error."""
    from .run.allocator import preload_env
    try:
        env = preload_env(dict(os.environ))
    except PhiloraError as e:
        _say(f"philora: error: {e}")
        sys.exit(2)
    if env is not None:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "philora", *sys.argv[1:]], env)


def run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from .run.allocator import active
        lib = active()
        if lib and os.environ.get("RANK", "0") == "0":  # once per run, not per torchrun rank
            print(f"malloc: {lib} (PHILORA_MALLOC=system keeps the system's allocator)")
        from .core.config import load_config
        from .run.train import train
        config, overrides = _config_args(args)
        from .run.preempt import SignalGuard
        from .use.report import end_of_run
        cfg = load_config(config, overrides)
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
        with SignalGuard() as guard:  # the run is saved: a signal now just stops the report
            guard.immediate(f"stopped while writing the report; the run is saved in "
                            f"{cfg.training_config.output_dir}")
            end_of_run(result, cfg)
        return 0
    if args.command == "data":
        if args.data_command == "check":
            from .core.config import load_config
            from .data.check import check_cli
            from .model.loading import load_tokenizer, resolve_path
            if args.out:
                guard_output(args.out, args.force, directory=True)
            cfg = load_config(*_config_args(args))
            tokenizer = load_tokenizer(resolve_path(cfg.model.name_or_path), cfg.model.trust_remote_code,
                                       cfg.model.revision)
            return check_cli(cfg, tokenizer, as_json=args.json, out=args.out,
                             processes=args.processes)
        build_parser().parse_args(["data", "--help"])
    if args.command == "merge":
        from .use.merge import merge
        guard_output(args.out, args.force, directory=True, inputs=(args.source, args.base))
        merge(args.source, args.out, base=args.base, dtype=args.dtype)
        return 0
    if args.command in ("generate", "chat"):
        from .use import generate
        sampling = dict(system=args.system, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens, seed=args.seed, base=args.base)
        if args.command == "chat":
            return generate.chat(args.source, **sampling)
        if args.out is not None:
            guard_output(args.out, args.force, directory=False)
        return generate.generate_cli(args.source, prompt=args.prompt, prompts=args.prompts,
                                     out=args.out, stream=not args.no_stream, **sampling)
    if args.command == "eval":
        from .use.report import evaluate_run
        guard_output(args.out, args.force, directory=True)
        evaluate_run(args.run, data=args.data, out=args.out, samples=args.samples,
                     max_new_tokens=args.max_new_tokens)
        return 0
    if args.command == "export":
        if args.export_format == "gguf":
            from .export.gguf import export_gguf
            from .export.toolparser import data_tools_shape, run_tokenizer
            from .model.loading import resolve_source
            src = resolve_source(args.source, args.base)  # the shape: the flag, else the run's data's
            shape = args.tools_shape or ("flat" if args.adapter_only or src.run_cfg is None
                                         else data_tools_shape(src, run_tokenizer(src)))
            export_gguf(args.source, args.out, outtype=args.outtype, force=args.force,
                        adapter_only=args.adapter_only, base=args.base, tools_shape=shape)
            return 0
        if args.export_format == "tool-parser":
            from .export.toolparser import export_tool_parser
            print("\n".join(export_tool_parser(args.source, args.out, args.tools_shape, args.force)[1]))
            return 0
        build_parser().parse_args(["export", "--help"])
    if args.command == "adapter":
        if args.adapter_command == "check":
            from .export.adapter_check import check_cli
            return check_cli(args.adapter, base=args.base)
        if args.adapter_command == "convert":
            from .export.adapter_convert import convert
            guard_output(args.out, args.force, directory=args.to == "peft")
            convert(args.source, args.out, to=args.to, r=args.r, lora_alpha=args.lora_alpha,
                    base=args.base, enable_lora=_enable_lora(args.enable_lora))
            return 0
        build_parser().parse_args(["adapter", "--help"])
    build_parser().print_help()
    return 0


def bench(argv: List[str]) -> int:
    """``philora bench``: bench/run.py of the source checkout, with its own options."""
    if not BENCH.is_file():
        raise PhiloraError(f"philora bench runs {BENCH.relative_to(BENCH.parents[1])} from a source checkout "
                           f"of philora; this installation has none (git clone the repository)")
    spec = importlib.util.spec_from_file_location("philora_bench_run", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([a for a in argv if a != "--"])


def _say(line: str) -> None:
    """One line on stderr in one write: under torchrun every rank may say it at once, and
    print's separate newline write lets their lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None and sys.argv[1:2] == ["train"]:
        _with_allocator()  # returns only when nothing is to change (allocator.py)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # bench has its own parser: pass its options through untouched
        try:
            return bench(argv[1:])
        except PhiloraError as e:
            _say(f"philora: error: {e}")
            return 2
    if argv[:1] == ["verify"]:  # export/verify.py parses its own options (torch loads only for this command)
        from .export.verify import main as verify_main
        try:
            return verify_main(argv[1:])
        except PhiloraError as e:
            _say(f"philora: error: {e}")
            return 2
        except OSError as e:
            _say(f"philora: error: {describe_os_error(e)}")
            return 1
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after an option (`philora train run.yaml --resume a.b=1`): argparse
    # stops filling a positional list at the first option, so collect the rest here.
    if args.command == "train" or getattr(args, "data_command", None) == "check":
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if not ("=" in a and not a.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .run.preempt import Interrupted
    try:
        return run(args)
    except PhiloraError as e:
        _say(f"philora: error: {e}")
        return 2
    except Interrupted as e:  # SIGTERM / SIGINT: the line says what was saved and how to go on
        _say(f"philora: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        _say("philora: interrupted")
        return 130
    except OSError as e:  # a file the user named or a disk we write to: one line, no traceback
        _say(f"philora: error: {describe_os_error(e)}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
