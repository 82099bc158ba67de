"""Serving throughput: `minigpt serve --parallel K` (continuous batching) vs `--parallel 1`.

    python bench/serve_throughput.py [--clients 4] [--new 200] [--repeats 3] [--threads N]
                                     [--tiny | --shape L H C V] [--vs-llamacpp DIR]

Seed config by default (6 layers, 6 heads, 384 wide, block 256, vocab 30000), random init, saved
as a model directory (a throwaway tokenizer) and served by two real `minigpt serve` processes on
127.0.0.1: one with `--parallel 1` (one request at a time, as before batching), one with
`--parallel K`. K clients (threads) each ask one server for `--new` tokens at once (greedy
/v1/completions, different prompts; <|endoftext|>'s embedding row is zeroed so no answer stops
early, and every answer's `completion_tokens` is checked). The two servers alternate within each
repeat, one idle while the other runs; prints the median aggregate completion tokens/s of each
and `ratio` = batched over one at a time. A decode step is bound by streaming the weights, which
a step for K rows does once, so the ratio approaches K while the rows' own work stays small.

`--vs-llamacpp DIR` adds llama.cpp's own server, `DIR/llama-server --parallel K` (continuous
batching, K slots of block_size) on our f32 GGUF export of the same weights, asked the same K
requests as token ids (/completion, greedy, end of text ignored) in the same alternation, and
prints its tokens/s and `ratio` = ours at --parallel K over llama.cpp's. Building llama-server:
as llama-completion (bench/generate_throughput.py), with `-DLLAMA_BUILD_SERVER=ON --target
llama-server`.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from generate_throughput import alternate, tiny_tokenizer  # noqa: E402

from minigpt.checkpoint import save_model  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.tokenizer import EOT, load_tokenizer, tokenizer_hash  # noqa: E402


def model_dir(path: Path, shape: tuple[int, int, int, int]) -> tuple[Path, GPT]:
    L, H, C, V = shape
    tiny_tokenizer(path.parent / "tokenizer.json")
    eot = load_tokenizer(path.parent / "tokenizer.json").token_to_id(EOT)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, n_layer=L, n_head=H, n_embd=C, block_size=256))
    with torch.no_grad():
        model.tok_emb.weight[eot] = 0.0  # tied head: its logit is 0, never the greedy choice
    meta = {"tokenizer_hash": tokenizer_hash(path.parent / "tokenizer.json"), "stage": "pretrain",
            "chat_template": None}
    save_model(model, path, tokenizer_file=path.parent / "tokenizer.json", meta=meta)
    return path, model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, what: str, log: Path) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"{what} did not start: {log.read_text()[-2000:]}")


def start(directory: Path, parallel: int, new: int, threads: int, log: Path) -> tuple:
    """A `minigpt serve` process on a free port, once /health answers: (process, url)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen([sys.executable, "-m", "minigpt.cli", "serve", "--checkpoint_path",
                             str(directory), "--port", str(port), "--device", "cpu",
                             "--max_tokens", str(new), "--parallel", str(parallel)],
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, f"server --parallel {parallel}", log)
    return proc, url


def start_llamacpp(directory: Path, model: GPT, k: int, threads: int, tmp: Path) -> tuple:
    """llama.cpp's `llama-server --parallel k` on our f32 GGUF export of the same weights."""
    from minigpt.export_gguf import export_gguf

    binary = directory / "llama-server"
    if not binary.is_file():
        sys.exit(f"error: --vs-llamacpp {directory}: no llama-server in it")
    eot = load_tokenizer(tmp / "tokenizer.json").token_to_id(EOT)
    gguf_file = export_gguf(model, tmp / "tokenizer.json", tmp / "m-f32.gguf", dtype="f32", name="bench",
                            chat_template=None, eos_id=eot, pad_id=eot, bos_id=None)
    port, log = free_port(), tmp / "llama-server.log"
    block = model.config.block_size
    proc = subprocess.Popen([str(binary), "-m", str(gguf_file), "--host", "127.0.0.1", "--port", str(port),
                             "-t", str(threads), "-tb", str(threads), "--parallel", str(k),
                             "-c", str(k * block), "--no-webui"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, "llama-server", log)
    return proc, url


def llamacpp_clients(url: str, k: int, new: int, prompts: list[list[int]], decode) -> list[str]:
    """The same k requests to llama-server: the prompts' token ids as our server would feed
    them, greedy, end of text ignored; its tokens decoded by our tokenizer (`decode`), as our
    server's answers are."""

    def ask(i: int) -> str:
        body = {"prompt": prompts[i], "n_predict": new, "temperature": 0, "ignore_eos": True,
                "cache_prompt": False, "return_tokens": True}
        r = httpx.post(url + "/completion", json=body, timeout=3600)
        r.raise_for_status()
        got = r.json()["tokens_predicted"]
        if got != new:
            raise RuntimeError(f"a llama.cpp request stopped after {got} of {new} tokens")
        return decode(r.json()["tokens"])

    with ThreadPoolExecutor(k) as pool:
        return list(pool.map(ask, range(k)))


def clients(url: str, k: int, new: int) -> list[str]:
    """k concurrent greedy requests of `new` tokens each; their texts."""

    def ask(i: int) -> str:
        body = {"prompt": f"a tiny corpus {i}", "max_tokens": new, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=3600)
        r.raise_for_status()
        got = r.json()["usage"]["completion_tokens"]
        if got != new:
            raise RuntimeError(f"a request stopped after {got} of {new} tokens")
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(k) as pool:
        return list(pool.map(ask, range(k)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (and --parallel)")
    ap.add_argument("--new", type=int, default=200, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="the servers' torch threads")
    ap.add_argument("--tiny", action="store_true", help="4 layers, 4 heads, 256 wide, vocab 8192")
    ap.add_argument("--shape", type=int, nargs=4, metavar=("L", "H", "C", "V"), help="any other size")
    ap.add_argument("--vs-llamacpp", metavar="DIR", help="also llama.cpp's llama-server --parallel K "
                    "(DIR holds the binary) on our f32 GGUF export")
    args = ap.parse_args()
    k, new = args.clients, args.new
    shape = args.shape or ((4, 4, 256, 8192) if args.tiny else (6, 6, 384, 30000))
    with tempfile.TemporaryDirectory() as tmp:
        directory, model = model_dir(Path(tmp) / "model", shape)
        servers = {n: start(directory, n, new, args.threads, Path(tmp) / f"serve{n}.log")
                   for n in (1, k)}
        try:
            runs = {f"parallel {n}": (lambda url=url: clients(url, k, new))
                    for n, (_, url) in servers.items()}
            if args.vs_llamacpp:
                tok = load_tokenizer(Path(tmp) / "tokenizer.json")
                prompts = [[tok.token_to_id(EOT)] + tok.encode(f"a tiny corpus {i}").ids for i in range(k)]
                servers["llama.cpp"] = start_llamacpp(Path(args.vs_llamacpp), model, k,
                                                      args.threads or torch.get_num_threads(), Path(tmp))
                runs["llama.cpp"] = lambda url=servers["llama.cpp"][1]: llamacpp_clients(url, k, new, prompts,
                                                                                         tok.decode)
            wall, _, texts = alternate(runs, args.repeats)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    one, many = wall["parallel 1"], wall[f"parallel {k}"]
    same = sum(a == b for a, b in zip(texts["parallel 1"], texts[f"parallel {k}"]))
    print(f"{shape[0]} layers, {shape[1]} heads, {shape[2]} wide, vocab {shape[3]}; {k} clients x "
          f"{new} greedy tokens, {args.threads or torch.get_num_threads()} threads")
    print(f"--parallel 1: {k * new / one:7.1f} tok/s  --parallel {k}: {k * new / many:7.1f} tok/s  "
          f"ratio {one / many:.2f}x  (same answers {same}/{k})")
    if args.vs_llamacpp:
        theirs = wall["llama.cpp"]
        same = sum(a == b for a, b in zip(texts["llama.cpp"], texts[f"parallel {k}"]))
        print(f"llama.cpp llama-server --parallel {k} (f32): {k * new / theirs:7.1f} tok/s  minigpt "
              f"--parallel {k}: {k * new / many:7.1f} tok/s  ratio {theirs / many:.2f}x  (same answers {same}/{k})")


if __name__ == "__main__":
    main()
