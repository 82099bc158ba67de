"""The decode benches at a trivial size: `bench/generate_throughput.py --vs-llamacpp` against a
stand-in for llama.cpp's `llama-completion` (its command line and its timing line),
`bench/quality.py`'s decode-dtype measurement (teacher-forced through the decode path),
`bench/decode_step.py`'s profile of one decode step, and `bench/serve_throughput.py`'s two servers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# A stand-in llama.cpp binary's first lines: it checks its model is a GGUF file and logs its arguments.
FAKE_ARGS = '''#!{python}
import json, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
assert open(value("-m"), "rb").read(4) == b"GGUF"
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
'''
FAKE = FAKE_ARGS + '''ms = {{"f32": 3.0, "q8_0": 1.5}}[value("-m").rsplit("-", 1)[1][:-5]]
n = int(value("-n")) - 1
print("some text")
print(f"llama_perf_context_print: prompt eval time =      10.00 ms /     5 tokens (    2.00 ms per token)", file=sys.stderr)
print(f"llama_perf_context_print:        eval time = {{ms * n:10.2f}} ms / {{n:5d}} runs   ({{ms:8.2f}} ms per token)", file=sys.stderr)
'''


def fake_binary(tmp_path: Path, name: str, template: str) -> tuple[Path, Path]:
    """tmp_path/bin/NAME made from `template`, and the log file it writes its calls to."""
    log, fake = tmp_path / "calls.txt", tmp_path / "bin" / name
    fake.parent.mkdir()
    fake.write_text(template.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    return fake, log


@pytest.mark.slow
@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="x86 kernels")
def test_vs_llamacpp_runs_both_sides_and_prints_ratios(tmp_path):
    pytest.importorskip("gguf")
    fake, log = fake_binary(tmp_path, "llama-completion", FAKE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "generate_throughput.py"),
                           "--vs-llamacpp", str(fake.parent), "--shape", "1", "2", "32", "320",
                           "--new", "6", "--prompt", "4", "--repeats", "2", "--threads", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "ratio" in ln]
    assert len(lines) == 2
    assert lines[0].startswith("minigpt fp32 ") and "llama.cpp f32 3.00 ms/token" in lines[0]
    assert lines[1].startswith("minigpt int8 ") and "llama.cpp q8_0 1.50 ms/token" in lines[1]
    calls = log.read_text().splitlines()
    assert len(calls) == 4  # two repeats of each pair, alternating with ours
    assert all("-t 1 " in c and "-n 6 " in c and "--temp 0 " in c and "--ignore-eos" in c for c in calls)
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "generate_throughput.py"),
                          "--vs-llamacpp", str(fake.parent), "--pairs", "int4:q8_0", "--tiny"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "error: --pairs int4:q8_0" in bad.stderr


def _quality_module():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="x86 kernels")
def test_decode_quality_is_the_full_forward_for_fp32():
    from minigpt.model import GPT, GPTConfig

    quality = _quality_module()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=32, block_size=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 50, 60).astype(np.uint16)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q = quality.decode_quality(model, tokens, ["int8"], max_tokens=40, prompts=2, new_tokens=5)
    finally:
        torch.set_num_threads(before)
    fp32, int8 = q["fp32"], q["int8"]
    assert fp32["tokens"] == int8["tokens"] == 40
    # teacher-forced decoding over non-overlapping windows = the full forward's perplexity
    assert math.isclose(fp32["ppl"], fp32["ppl_full_forward"], rel_tol=1e-4)
    assert int8["ppl"] != fp32["ppl"] and math.isclose(int8["ppl_ratio"], 1.0, rel_tol=0.05)
    assert 0.0 <= int8["argmax_agree"] <= 1.0 and 0.0 <= int8["greedy_agree"] <= 1.0
    assert model.decode_dtype == "fp32"  # put back


@pytest.mark.slow
def test_decode_step_profile_splits_a_step_and_times_both_layouts():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "bench" / "decode_step.py"), "--tiny", "--steps", "2", "--threads", "1"]
    out = subprocess.run(cmd + ["--layouts"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    ops = int(out.stdout.split(" ops per step")[0].rsplit("\n", 1)[-1])
    assert 100 < ops < 300  # the fp32 step's ops, as the profiler counts them
    for part in ("weight matmuls", "attention bmm", "everything else", "aten::bmm", "(in, out)"):
        assert part in out.stdout, part
    bad = subprocess.run(cmd + ["--pos", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "error: --pos 0" in bad.stderr


FAKE_SERVER = FAKE_ARGS + '''from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply({{"status": "ok"}})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open({log!r}, "a") as f:
            f.write(json.dumps(req) + "\\n")
        n = req["n_predict"]  # a stand-in: token 20, n times
        self.reply({{"tokens": [20] * n, "tokens_predicted": n, "content": "?"}})

HTTPServer((value("--host"), int(value("--port"))), Handler).serve_forever()
'''


@pytest.mark.slow
def test_serve_throughput_runs_both_servers_and_prints_a_ratio(tmp_path):
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("gguf")
    fake, log = fake_binary(tmp_path, "llama-server", FAKE_SERVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_throughput.py"), "--shape",
                           "1", "2", "32", "320", "--clients", "3", "--new", "40", "--repeats", "1",
                           "--threads", "1", "--vs-llamacpp", str(fake.parent)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ours, theirs = proc.stdout.splitlines()[-2:]
    assert ours.startswith("--parallel 1: ") and "--parallel 3: " in ours and " ratio " in ours
    assert "(same answers 3/3)" in ours  # and each ran its 40 tokens (the bench checks)
    assert theirs.startswith("llama.cpp llama-server --parallel 3 (f32): ") and " ratio " in theirs
    calls = log.read_text().splitlines()
    assert "--parallel 3 " in calls[0] and "-t 1 " in calls[0] and "-c 768 " in calls[0]
    requests = [json.loads(c) for c in calls[1:]]
    assert len(requests) == 6  # a warm-up and one repeat of 3 clients
    assert all(r["n_predict"] == 40 and r["temperature"] == 0 and r["ignore_eos"] for r in requests)
    assert len({tuple(r["prompt"]) for r in requests}) == 3  # each client its own prompt ids
