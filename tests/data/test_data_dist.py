"""Under torchrun, one process per node tokenizes and the node's others map its cache
(distributed.local_first): two real gloo processes (forked), the second forbidden to tokenize;
a bad record on the tokenizing process is the same one-line error on both, and nobody hangs."""

import json
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from philora.data import build as data
from philora.run import distributed
from philora.core.config import DataConfig
from philora.run.distributed import World


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, port, path, cache, tok_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if rank == 1:  # the node's second process must only read what the first one cached
        data.encode_chat = lambda *a, **k: 1 / 0
    logs = []
    try:
        train, evals, _ = distributed.local_first(World(rank, 2, rank), lambda: data.build_datasets(
            DataConfig(train=path, cache_dir=cache, eval_fraction=0.25), tok, 7, logs.append))
        result = {"train": [e["input_ids"] for e in train], "eval": [e["input_ids"] for e in evals], "logs": logs}
    except Exception as e:  # noqa: BLE001 (reported to the test)
        result = {"error": f"{type(e).__name__}: {e}"}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def run_two(tmp_path, records, tok_dir):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "result"
    mp.start_processes(worker, args=(free_port(), str(path), str(tmp_path / "cache"), str(tok_dir), str(out)),
                       nprocs=2, start_method="fork")
    return [json.loads((tmp_path / f"result.{r}").read_text()) for r in (0, 1)]


def chat(i):
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def test_the_second_process_maps_the_first_ones_cache(tmp_path, phi3_tokenizer_dir):
    first, second = run_two(tmp_path, [chat(i) for i in range(16)], phi3_tokenizer_dir)
    assert "error" not in first and "error" not in second, (first, second)
    assert first["train"] == second["train"] and first["eval"] == second["eval"] and len(first["eval"]) == 4
    assert any("tokenized" in line and "from the cache" not in line for line in first["logs"])
    assert any("from the cache" in line for line in second["logs"])


def test_a_bad_record_on_the_first_process_stops_both(tmp_path, phi3_tokenizer_dir):
    first, second = run_two(tmp_path, [chat(0), {"messages": "oops"}, chat(2)], phi3_tokenizer_dir)
    line = f"{tmp_path / 't.jsonl'}:2: 'messages' must be a list of messages, got str"
    assert first == {"error": f"DataError: {line}"} and second == {"error": f"PhiloraError: {line}"}
