"""verify's vLLM engine contract (export/engines.py): how vLLM's python is run and what its reply becomes.

A fake vLLM python (a shell script running this python on a small script) answers as VLLM_SCRIPT does: a
parser's non-JSON arguments fail that prompt's calls, not the engine; a vLLM without server-side prompt
rendering is said once and each reply marked; the child runs in its own process group, killed whole on a
timeout (vLLM's EngineCore outlives its parent otherwise), with VLLM_ENABLE_V1_MULTIPROCESSING=0 unless
set. In real vLLM (.venv-vllm): VLLM_SCRIPT's tool_parser() reports a chat request vLLM refuses instead of
swallowing it, and needs no request without tools. The vLLM rank rule: adapter_check.vllm_max_lora_rank.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from philora.core.errors import PhiloraError
from philora.export.adapter_check import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank
from philora.export.engines import VLLM_SCRIPT, vllm_greedy


def _fake(tmp_path, body: str):
    """A 'python' that runs ``body`` (with the request on stdin as ``req``)."""
    script = tmp_path / "fake.py"
    script.write_text("import json, os, sys, time\nreq = json.load(sys.stdin)\n" + body)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    python.chmod(0o755)
    return str(python)


def _reply(outputs, **extra):
    return f"print(json.dumps({ {'vllm': 'fake', 'outputs': outputs, **extra}!r}))\n"


OUT = {"token_ids": [5, 6, 7], "finish_reason": "stop", "stop_reason": None}


def test_non_json_arguments_fail_that_prompt_only(tmp_path):
    """A parser's arguments that are not JSON: that call is {"invalid": ...}; the other prompt's calls and
    the engine stand (the engine failed as a whole before: JSONDecodeError)."""
    calls = [{"text": "t", "calls": [{"name": "f", "arguments": "{oops"}]},
             {"text": "t", "calls": [{"name": "g", "arguments": "{\"x\": 1}"}]}]
    python = _fake(tmp_path, _reply([dict(OUT, tool_calls=c) for c in calls]))
    got = vllm_greedy(python, {"tool_parser": "hermes"})
    assert [r["tool_calls"] for r in got] == [[{"invalid": "f({oops)"}], [{"name": "g", "arguments": {"x": 1}}]]
    assert got[0]["tokens"] == [5, 6, 7] and got[0]["stopped"] and got[0]["tool_parser"] == "vLLM hermes"


def test_unchecked_prompts_are_said_once(tmp_path):
    """A vLLM without OnlineRenderer: one line, and each reply says the prompt was not checked (which
    verify's table shows instead of 'tokens in')."""
    note = "vLLM 0.9.0 has no OnlineRenderer (vllm serve's chat rendering)"
    python = _fake(tmp_path, _reply([OUT, OUT], prompt_unchecked=note).replace("'fake'", "'0.9.0'"))
    lines = []
    got = vllm_greedy(python, {}, say=lines.append)
    assert lines == [f"verify: vllm: {note}: the prompts are not checked against vllm serve's rendering (tokens in)"]
    assert [r["prompt_unchecked"] for r in got] == ["not checked (vLLM 0.9.0)"] * 2
    assert all(r["prompt"] is None for r in got)
    python = _fake(tmp_path, _reply([OUT]))
    assert "prompt_unchecked" not in vllm_greedy(python, {}, say=lines.append)[0] and len(lines) == 1


def test_child_environment_and_process_group(tmp_path):
    """VLLM_ENABLE_V1_MULTIPROCESSING=0 unless the user set it; on a timeout the whole process group dies,
    a daemon grandchild (as vLLM's EngineCore) included."""
    env_file, pid_file = tmp_path / "env.txt", tmp_path / "pid.txt"
    python = _fake(tmp_path, f"open({str(env_file)!r}, 'w').write(os.environ.get('VLLM_ENABLE_V1_MULTIPROCESSING', '-'))\n"
                   + _reply([OUT]))
    vllm_greedy(python, {})
    assert env_file.read_text() == "0"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    try:
        vllm_greedy(python, {})
    finally:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    assert env_file.read_text() == "1"
    # a grandchild in its own double fork (not waited for), then the child hangs
    python = _fake(tmp_path, "import subprocess\n"
                   f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                   f"open({str(pid_file)!r}, 'w').write(str(p.pid))\ntime.sleep(120)\n")
    t0 = time.monotonic()
    with pytest.raises(PhiloraError) as e:
        vllm_greedy(python, {}, timeout=3)
    assert "did not finish in 3 s" in str(e.value) and time.monotonic() - t0 < 30
    pid = int(pid_file.read_text())
    for _ in range(50):  # the grandchild is killed with the group (reaped by init: gone, or a zombie)
        try:
            state = open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the grandchild outlived the timeout")


def test_max_lora_rank():
    """The smallest rank vLLM accepts that holds the adapter's; beyond 512 one line (was StopIteration)."""
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 300, 320, 321, 512)] == [1, 8, 8, 16, 320, 320, 512, 512]
    assert VLLM_MAX_LORA_RANKS[-1] == 512
    with pytest.raises(PhiloraError) as e:
        vllm_max_lora_rank(600)
    assert str(e.value) == "rank 600 is beyond vLLM's largest --max-lora-rank (512)"


DRIVER = r'''
import json, sys
from transformers import AutoTokenizer
sys.argv = ["vllm_script"]
ns = {"__name__": "philora_vllm_script"}
exec(open(SCRIPT).read(), ns)
tok = AutoTokenizer.from_pretrained(MODEL)
plugin = PLUGIN
base = {"model": MODEL, "tool_parser": "philora_phi4_mini", "tool_parser_plugin": plugin}
out = {}
for label, extra in (("no tools", {"tools": None}),
                     ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
                     ("invalid tools", {"tools": [{"type": "function", "function": {"name": 3}}]}),
                     ("no such parser", {"tools": None, "tool_parser": "nope", "tool_parser_plugin": None})):
    parser, error, skip, request = ns["tool_parser"](dict(base, **extra), tok)
    out[label] = {"parser": parser is not None, "error": error, "skip": skip, "request": request is not None}
print(json.dumps(out))
'''


def test_vllm_script_tool_parser_in_real_vllm(vllm_python, families, tmp_path):
    """VLLM_SCRIPT's tool_parser() in real vLLM with philora's plugin: no chat request without tools (the
    server's default, special tokens skipped); with tools the plugin keeps them; tools vLLM's request model
    refuses and a parser that does not load are reported, not swallowed (the first read as no error)."""
    from philora.export.toolparser import write_plugin
    script = tmp_path / "vllm_script.py"
    script.write_text(VLLM_SCRIPT)
    plugin = write_plugin(tmp_path / "plugin.py")
    driver = tmp_path / "driver.py"
    driver.write_text(f"SCRIPT = {str(script)!r}\nMODEL = {str(families.dir('phi4-mini'))!r}\n"
                      f"PLUGIN = {str(plugin)!r}\n" + DRIVER)
    proc = subprocess.run([vllm_python, str(driver)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["no tools"] == {"parser": True, "error": None, "skip": True, "request": False}
    assert got["tools"] == {"parser": True, "error": None, "skip": False, "request": True}
    assert got["invalid tools"]["error"].startswith("the chat request with the run's tools: ValidationError")
    assert got["invalid tools"]["skip"] is True
    assert got["no such parser"]["parser"] is False and got["no such parser"]["error"].startswith("KeyError")


def test_the_table_says_a_prompt_was_not_checked():
    """verify.md's prompt cell: 'n/n same' when checked, the engine's note when it could not be."""
    from philora.export.agreement import markdown
    engine = {"engine": "vllm", "status": "ok", "identical": 2, "near_ties": 0, "stops_on_eot": 2, "prompts_same": 0,
              "prompts_checked": 0, "seconds": 1.0, "failures": [], "prompt_unchecked": "not checked (vLLM 0.9.0)"}
    result = {"prompts": [1, 2], "end_of_turn": {"id": 7, "token": "<|end|>"}, "run": "r", "max_new_tokens": 4,
              "dtype": "float32", "adapter_changes": 2, "ok": True, "engines": [engine],
              "reference": {"stops_on_eot": 2, "seconds": 1.0, "replies": []},
              "base": {"identical": 0, "stops_on_eot": 0, "first_divergence": None}}
    assert "| 2/2 | not checked (vLLM 0.9.0) | – |" in markdown(result)
    checked = dict(engine, prompts_same=2, prompts_checked=2)
    assert "| 2/2 same |" in markdown(dict(result, engines=[checked]))
