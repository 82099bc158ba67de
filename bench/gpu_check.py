"""One accelerator, end to end: the seed-sized pipeline on real text, then speed against peers.

    python bench/gpu_check.py [--device cuda] [--data DIR | --pretrain FILE... --sft FILE]
                              [--steps 600] [--keep DIR] [--tiny]

1. Pipeline: in a temporary copy of this checkout (git and DVC initialised, the local sources
   `dvc add`ed), ONE `dvc exp run` with -S overrides runs process -> tokenizer -> encode ->
   pretrain -> finetune -> eval: the seed-sized model (6 layers, 6 heads, 384 wide, block 256,
   vocabulary up to 30,000), `dtype: auto` (bf16 where the GPU runs it natively, else fp16 with
   loss scaling) and `compile: true` on CUDA. Prints each training stage's tokens/s, MFU, dtype
   and skipped fp16 steps (from its metrics), the eval metrics and the answers to the eval prompts.
2. Training step vs transformers' GPT-2 (`bench/train_throughput.py`, same device): bf16 +
   compile; on a GPU without native bf16, fp16 + compile and the emulated bf16 beside it.
3. Decoding vs transformers (`bench/generate_throughput.py`, same device): tokens/s and the ratio,
   in fp32 and the GPU's half precision.

Data: `--data DIR` in the layout of the project's shared data folder (`wikitext-2-raw/` train,
valid and test `.raw` files, optional `extra/*.txt` prose added to train, `dolly/*.jsonl`);
default `$MINIGPT_DATA`, else `../shared/data` beside the checkout. Or any local text:
`--pretrain FILE...` (plain text or WikiText raw: the files whose names carry no split are train;
`wiki.valid.raw`-style names are kept as splits) and `--sft FILE` (Dolly-style JSON lines).
Every step's command is printed; a failing one stops the check with its output's tail and exit
status 1. `--device cpu --tiny` runs the same path at a trivial size: the CI dry run
(tests/test_gpu_check.py). The seed-sized defaults are sized for a 10-minute budget on one CUDA
GPU; `--steps` trades pre-training length for time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPO_FILES = ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore")
REPO_DIRS = ("minigpt", "stages")

# The seed-sized run (README "The seed-sized run") on the local text, within the time budget.
SEED = {
    "tokenizer.vocab_size": 30000,
    "model.n_layer": 6, "model.n_head": 6, "model.n_embd": 384, "model.block_size": 256,
    "pretrain.batch_size": 32, "pretrain.eval_interval": 200, "pretrain.save_interval": 1000,
    "pretrain.log_interval": 50, "finetune.batch_size": 32, "finetune.max_steps": 150,
    "finetune.eval_interval": 50, "finetune.save_interval": 150,
}
# --tiny: every stage for real, in seconds on two CPU cores.
TINY = {
    "process.pretrain.max_documents": 40,
    "tokenizer.vocab_size": 400,
    "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
    "pretrain.batch_size": 4, "pretrain.warmup_steps": 2, "pretrain.eval_interval": 3,
    "pretrain.eval_batches": 2, "pretrain.save_interval": 6, "pretrain.log_interval": 2,
    "finetune.batch_size": 4, "finetune.max_steps": 4, "finetune.warmup_steps": 1,
    "finetune.eval_interval": 2, "finetune.eval_batches": 2, "finetune.save_interval": 4,
    "finetune.log_interval": 2,
    "eval.stride": 16, "eval.max_tokens": 2000, "eval.generate_examples": 2, "eval.max_new_tokens": 8,
}


class CheckFailed(RuntimeError):
    pass


def run(cmd: list[str], cwd: Path, env: dict | None = None, echo: bool = False) -> str:
    """Run one step; its output comes back (and is shown when `echo`); a failure stops the check."""
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise CheckFailed(f"{cmd[0]} ... exited with {proc.returncode} after "
                          f"{time.perf_counter() - start:.0f}s:\n{out[-4000:]}")
    if echo:
        print(proc.stdout.rstrip(), flush=True)
    print(f"  ({time.perf_counter() - start:.1f}s)", flush=True)
    return out


def sources(args) -> tuple[list[Path], list[Path]]:
    """(pretrain files, sft files) from --pretrain/--sft, or from --data's shared-data layout."""
    if args.pretrain or args.sft:
        if not (args.pretrain and args.sft):
            raise CheckFailed("--pretrain and --sft go together")
        files = [Path(p) for p in args.pretrain], [Path(args.sft)]
    else:
        data = Path(args.data)
        prose = sorted((data / "wikitext-2-raw").glob("*.raw")) + sorted((data / "extra").glob("*.txt"))
        files = prose, sorted((data / "dolly").glob("*subset*.jsonl"))
        if not files[1]:
            files = files[0], sorted((data / "dolly").glob("*.jsonl"))[:1]
    for group, what in zip(files, ("pretrain", "sft")):
        if not group:
            raise CheckFailed(f"no {what} text found under {args.data} (see --help)")
        for path in group:
            if not path.is_file():
                raise CheckFailed(f"{path}: not a file")
    return files


def make_repo(tmp: Path, pretrain: list[Path], sft: list[Path]) -> Path:
    """A copy of this checkout with the sources as DVC-tracked raw/pretrain and raw/sft."""
    repo = tmp / "repo"
    repo.mkdir()
    for name in REPO_FILES:
        shutil.copy(ROOT / name, repo / name)
    for name in REPO_DIRS:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "raw" / "pretrain").mkdir(parents=True)
    (repo / "raw" / "sft").mkdir()
    shutil.copy(ROOT / "raw" / ".gitignore", repo / "raw" / ".gitignore")
    for path in pretrain:
        name = path.name
        if "train" in name and "." in name:  # wiki.train.first1000lines.raw -> wiki.train.raw
            name = name.split("train")[0] + "train" + path.suffix
        elif not any(s in name for s in ("valid", "test")):
            name = f"{path.stem}.train{path.suffix}"  # prose without a split: train text
        with open(repo / "raw" / "pretrain" / name, "ab") as out:  # same split twice: one file
            out.write(path.read_bytes().rstrip(b"\n") + b"\n")
    shutil.copy(sft[0], repo / "raw" / "sft" / "train.jsonl")
    return repo


def init_repo(repo: Path, env: dict) -> None:
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    run([sys.executable, "-m", "dvc", "add", "-q", "raw/pretrain", "raw/sft"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "gpu check"], repo, env)


def overrides(args) -> dict:
    sets = {"process.pretrain.source": "raw/pretrain", "process.pretrain.name": "null",
            "process.sft.source": "raw/sft"}
    sets.update(TINY if args.tiny else {**SEED, "pretrain.max_steps": args.steps})
    if args.tiny:
        sets["pretrain.max_steps"] = 6
    for stage in ("pretrain", "finetune"):
        sets[f"{stage}.device"] = args.device
        sets[f"{stage}.dtype"] = "auto"
        sets[f"{stage}.compile"] = str(args.device.startswith("cuda")).lower()
    sets["eval.device"] = args.device
    return sets


def report_pipeline(repo: Path) -> None:
    for stage in ("pretrain", "finetune"):
        m = json.loads((repo / "metrics" / f"{stage}.json").read_text())
        info = json.loads((repo / "out" / stage / "config.json").read_text())["training"]
        print(f"{stage}: {info['dtype']} on {info['device']}, {m['steps']} steps, "
              f"{m['tokens_per_s']:,.0f} tok/s, mfu {100 * m['mfu']:.1f}%, val loss "
              f"{m['first_val_loss']:.3f} -> {m['val_loss']:.3f}, "
              f"fp16 steps skipped {m.get('skipped_steps', 0)}", flush=True)
    for model in ("pretrain", "finetune"):
        e = json.loads((repo / "metrics" / "eval" / f"{model}.json").read_text())
        flat = {k: v for k, v in _flatten(e).items() if not k.startswith(("settings", "baseline"))}
        print(f"eval {model}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in flat.items()), flush=True)
    answers = json.loads((repo / "metrics" / "samples" / "finetune.json").read_text())
    print("answers of the fine-tuned model to the eval prompts:")
    for prompt, answer in answers.items():
        print(f"  Q: {prompt}\n  A: {answer!r}")


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def native_bf16(device: str) -> bool:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_capability(torch.device(device))[0] >= 8
    from minigpt.hardware import cpu_has_bf16

    return device == "cpu" and cpu_has_bf16()


def speed(args, env: dict) -> None:
    """Training step and decoding against transformers, on the same device."""
    cuda = args.device.startswith("cuda")
    half = "bf16" if native_bf16(args.device) else "fp16" if cuda else None
    train_dtypes = ([half] if half == "bf16" else ["fp16", "bf16"]) if cuda else [half or "fp32"]
    size = (["--shape", "1", "2", "32", "32", "400", "4", "--steps", "2", "--warmup", "1"] if args.tiny
            else ["--batch", "32", "--steps", "20"])
    out = run([sys.executable, "bench/train_throughput.py", "--device", args.device, *size,
               *(["--compile"] if cuda else []), "--dtype", *train_dtypes], ROOT, env)
    print("\n".join(line for line in out.splitlines() if " ours " in line), flush=True)
    size = (["--shape", "1", "2", "32", "400", "--new", "8", "--repeats", "1", "--prompt", "8"]
            if args.tiny else ["--new", "200", "--repeats", "3"])
    dtypes = "fp32" + (f",{half}" if half else "")
    out = run([sys.executable, "bench/generate_throughput.py", "--device", args.device, *size,
               "--dtypes", dtypes], ROOT, env)
    print("\n".join(line for line in out.splitlines() if "ratio" in line), flush=True)


def main(argv: list[str] | None = None) -> int:
    default_data = os.environ.get("MINIGPT_DATA", str(ROOT.parent / "shared" / "data"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, mps or cpu")
    ap.add_argument("--data", default=default_data, help="a folder in the shared-data layout")
    ap.add_argument("--pretrain", nargs="+", help="pre-training text files (instead of --data)")
    ap.add_argument("--sft", help="a Dolly-style JSON lines file (instead of --data)")
    ap.add_argument("--steps", type=int, default=600, help="pre-training steps (batch 32 x 256)")
    ap.add_argument("--keep", help="build the temporary repository here and keep it")
    ap.add_argument("--tiny", action="store_true", help="trivial sizes: the CPU dry run")
    ap.add_argument("--skip-speed", action="store_true", help="only the pipeline")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT),
           "GIT_AUTHOR_NAME": "gpu-check", "GIT_AUTHOR_EMAIL": "gpu-check@localhost",
           "GIT_COMMITTER_NAME": "gpu-check", "GIT_COMMITTER_EMAIL": "gpu-check@localhost"}
    sys.path.insert(0, str(ROOT))
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="minigpt-gpu-check-"))
    try:
        import torch

        where = args.device
        if where.startswith("cuda"):
            where = torch.cuda.get_device_name(torch.device(where))
        print(f"minigpt GPU check: {where}, torch {torch.__version__}", flush=True)
        pretrain, sft = sources(args)
        tmp.mkdir(parents=True, exist_ok=True)
        repo = make_repo(tmp, pretrain, sft)
        init_repo(repo, env)
        sets = [a for k, v in overrides(args).items() for a in ("-S", f"{k}={v}")]
        run([sys.executable, "-m", "dvc", "exp", "run", *sets], repo, env)
        report_pipeline(repo)
        if not args.skip_speed:
            speed(args, env)
    except CheckFailed as e:
        print(f"gpu check failed: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"gpu check passed in {time.perf_counter() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
