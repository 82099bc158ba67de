"""Hostile and broken inputs (issue 10): model directories, checkpoints, prompts, exports, data.

Every test builds its own hostile fixture (a crafted meta.json, a crafted config.json, bad bytes)
and drives the code the way a user does: `python stages/*.py` in a temporary project, the real
`minigpt` CLI in a subprocess, or the library call a stage makes. Where one rule has several
variants, the first runs the real process and the others its entry point (`cli.main`, a stage's
main()) in-process. Memory cases run in a subprocess under `resource.setrlimit(RLIMIT_AS)` and
must fail with one clear line in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from minigpt.checkpoint import CheckpointError, load_model, save_model
from minigpt.config import ConfigError, PretrainDataConfig, load_params
from minigpt.data import process_pretrain
from minigpt.sources import DataError, read_records
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import encode_text, save_tokenizer, tokenizer_hash, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the river runs through old city band plays on bridge king north built church".split()
CORPUS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) + "." for i in range(60)]
MEM_LIMIT = 3 * 2**30  # RLIMIT_AS for the memory cases: torch + tokenizers need ~0.7 GB


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "RAYON_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _run(args: list, cwd: Path | None = None, stdin: bytes = b"", timeout: float = 120,
         limit_as: int | None = None) -> subprocess.CompletedProcess:
    pre = None
    if limit_as:
        def pre():  # noqa: E306  (runs in the child before exec)
            import resource
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
    return subprocess.run(args, cwd=cwd, env=_env(), input=stdin, capture_output=True,
                          timeout=timeout, preexec_fn=pre)


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "minigpt.cli", *args], **kw)


def _cli_here(capsys, *args) -> subprocess.CompletedProcess:
    """The CLI's entry point (`minigpt.cli.main`) in this process, its exit status and output
    as `_cli` gives them. For the further variants of one rule: the first variant of each runs
    the real CLI in a subprocess (`_cli_or_here`), which checks the process boundary; the
    others check the rule itself without a ~2 s Python + torch start each."""
    from minigpt import cli

    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["minigpt", *args], code, out.encode(), err.encode())


def _cli_or_here(real: bool, capsys, *args) -> subprocess.CompletedProcess:
    return _cli(*args) if real else _cli_here(capsys, *args)


def _one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer(CORPUS, vocab_size=300), path)
    return path


def _model_dir(path: Path, tok_file: Path, vocab_size: int | None = None, **meta) -> Path:
    from tokenizers import Tokenizer

    vocab = vocab_size or Tokenizer.from_file(str(tok_file)).get_vocab_size()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, n_layer=1, n_head=2, n_embd=32, block_size=32))
    save_model(model, path, tokenizer_file=tok_file,
               meta={"tokenizer_hash": tokenizer_hash(tok_file), "stage": "pretrain",
                     "chat_template": None, **meta})
    return path


@pytest.fixture
def model_dir(tmp_path, tok_file) -> Path:
    return _model_dir(tmp_path / "m", tok_file)


TINY_PARAMS = {
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16},
    "pretrain": {"device": "cpu", "dtype": "fp32", "batch_size": 2, "max_steps": 2,
                 "warmup_steps": 1, "eval_interval": 2, "eval_batches": 1, "save_interval": 2,
                 "log_interval": 1},
    "eval": {"stride": 16},  # <= block_size, checked at load
}


@pytest.fixture(scope="module")
def project_template(tmp_path_factory, tok_file) -> Path:
    """A project with a tokenizer and encoded pretrain tokens: `stages/pretrain.py` runs in it."""
    from minigpt.encode import encode_corpus

    root = tmp_path_factory.mktemp("project")
    (root / "data/tokenizer").mkdir(parents=True)
    (root / "data/tokenizer/tokenizer.json").write_bytes(tok_file.read_bytes())
    processed = root / "data/processed/pretrain"
    processed.mkdir(parents=True)
    for split, n in (("train", 40), ("validation", 10), ("test", 10)):
        (processed / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": " ".join(CORPUS[i:i + 3])}) + "\n" for i in range(n)))
    encode_corpus("pretrain", processed, root / "data/tokenizer/tokenizer.json",
                  root / "data/tokens/pretrain", 16)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    return root


def copy_of(template: Path, parent: Path) -> Path:
    """A copy of a project made once per module, as parent/project, for one test to change."""
    import shutil

    return Path(shutil.copytree(template, parent / "project"))


@pytest.fixture
def project(project_template, tmp_path) -> Path:
    return copy_of(project_template, tmp_path)


def _set_params(root: Path, **sections) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for k, v in sections.items():
        params[k] = {**params.get(k, {}), **v}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def _stage(root: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(ROOT / "stages" / args[0]), *args[1:]], cwd=root,
                timeout=timeout)


def _stage_here(root: Path, request, *args: str) -> subprocess.CompletedProcess:
    """`_stage`'s result from the stage's main() in this process (cwd `root`, no torchrun env,
    `stage_in_process`): for the further variants of a rule whose first variant runs the real
    `python stages/...` (the process boundary is checked there)."""
    import importlib.util

    mp, capsys = request.getfixturevalue("monkeypatch"), request.getfixturevalue("capsys")
    request.getfixturevalue("stage_in_process")
    mp.chdir(root)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
                "MINIGPT_DEBUG"):
        mp.delenv(key, raising=False)
    mp.setattr(sys, "argv", [args[0], *args[1:]])
    spec = importlib.util.spec_from_file_location(f"stage_{args[0][:-3]}", ROOT / "stages" / args[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    code = module.main() if len(args) == 1 else module.main(list(args[1:]))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([args[0], *args[1:]], code, out.encode(), err.encode())


# --- 1. path traversal from meta.json -------------------------------------------------------------

@pytest.mark.slow
def test_hostile_meta_json_never_touches_files_outside_the_checkpoint(project):
    ckpt = project / "out/ckpt/pretrain"
    ckpt.mkdir(parents=True)
    attack, victim = b"attacker bytes\n", b"the user's precious file\n"
    (ckpt / "attack.bin").write_bytes(attack)
    (project / "victim.txt").write_bytes(victim)
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    (ckpt / "meta.json").write_text(json.dumps({
        "format": "minigpt-ckpt-v1", "step": 1, "meta": {"stage": "someone else's"},
        "files": {"../../../evil.txt": {"sha256": sha(attack), "tmp": "attack.bin"},  # write out
                  "model.safetensors": {"sha256": sha(victim), "tmp": "../../../victim.txt"}}}))
    proc = _stage(project, "pretrain.py")
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out[-3000:]
    assert not (project / "evil.txt").exists()  # nothing written outside
    assert (project / "victim.txt").read_bytes() == victim  # nothing moved in from outside
    assert (ckpt / "attack.bin").read_bytes() == attack  # not ours: left alone
    warnings = [line for line in out.splitlines() if "refusing unsafe" in line]
    assert len(warnings) == 1 and "starting fresh" in warnings[0], out[-3000:]
    record = json.loads((ckpt / "meta.json").read_text())  # and a fresh, real checkpoint
    assert set(record["files"]) == {"model.safetensors", "state.pt"} and record["step"] == 2


@pytest.mark.parametrize("name, tmp", [
    ("model.safetensors", "/etc/passwd"), ("../x.safetensors", ".x.safetensors.1-0123abcd.tmp"),
    ("model.safetensors", ".state.pt.1-0123abcd.tmp"), ("meta.json", ".meta.json.1-0123abcd.tmp"),
    ("model.safetensors", "../.model.safetensors.1-0123abcd.tmp")])
def test_meta_json_entries_must_be_plain_expected_names(tmp_path, name, tmp):
    from minigpt.resume import finish_commit, read_state_meta

    (tmp_path / "meta.json").write_text(json.dumps({
        "format": "minigpt-ckpt-v1", "step": 1, "meta": {},
        "files": {name: {"sha256": "0" * 64, "tmp": tmp}}}))
    for call in (read_state_meta, finish_commit):
        with pytest.raises(CheckpointError, match="refusing unsafe"):
            call(tmp_path)


# --- 2. hostile config.json -----------------------------------------------------------------------

HOSTILE_CONFIGS = [  # (override, field named in the error)
    ({"vocab_size": 10**12}, "vocab_size"),  # 128 TB of embedding
    ({"vocab_size": 1e12}, "vocab_size"),  # a float
    ({"block_size": 10**9}, "block_size"),  # 32 GB of RoPE tables
    ({"block_size": -5}, "block_size"),
    ({"n_layer": 10**6}, "n_layer"),  # grows until memory runs out
    ({"n_layer": 1000}, "layers.1."),  # in range, but the weights hold one layer
    ({"n_head": 0}, "n_head"),
    ({"n_head": 3}, "n_head"),  # does not divide n_embd
    ({"rope_theta": "abc"}, "rope_theta"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"norm_eps": float("nan")}, "norm_eps"),
    ({"n_layer": True}, "n_layer"),
    ({"vocab_size": 2**20}, "tok_emb.weight"),  # in range: the weights' shape gives it away
    ({"n_layer": 1024, "block_size": 2**20}, "block_size"),  # a 32 GiB KV cache
]


def _hostile_config(model_dir: Path, override: dict) -> list[str]:
    """Write `override` into model_dir's config.json; the CLI arguments that load it."""
    config = json.loads((model_dir / "config.json").read_text())
    text = json.dumps({**config, **override})  # NaN is written as NaN, which json reads back
    (model_dir / "config.json").write_text(text)
    return ["generate", "--checkpoint_path", str(model_dir), "--device", "cpu", "--max_new_tokens", "1"]


# cli.main once per argv list (argv[1], JSON) in this one process: [[exit status, stderr], ...];
# an exception is a traceback and status 1, as `python -m minigpt.cli` would give.
_CLI_MAIN_PER_ARGV = """
import contextlib, io, json, sys, traceback
from minigpt import cli
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except Exception:
            traceback.print_exc()
            code = 1
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hostile_configs_in_one_process(tmp_path_factory, tok_file) -> dict:
    """HOSTILE_CONFIGS[1:], each in its own model directory, through cli.main in ONE subprocess
    under the same memory limit (HOSTILE_CONFIGS[0] runs the real CLI alone): a config that
    allocated before it was refused still fails there, in seconds, with MemoryError."""
    cases = {}
    for i, (override, _) in enumerate(HOSTILE_CONFIGS[1:], 1):
        d = _model_dir(tmp_path_factory.mktemp(f"hostile{i}") / "m", tok_file)
        cases[i] = (d, _hostile_config(d, override))
    proc = _run([sys.executable, "-c", _CLI_MAIN_PER_ARGV, json.dumps([a for _, a in cases.values()])],
                limit_as=MEM_LIMIT, timeout=90 + 10 * len(cases))  # not minutes of swapping
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    results = json.loads(proc.stdout)
    return {i: (d, subprocess.CompletedProcess(argv, code, b"", err.encode()))
            for (i, (d, argv)), (code, err) in zip(cases.items(), results)}


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(HOSTILE_CONFIGS)),
                         ids=[json.dumps(o)[:40] for o, _ in HOSTILE_CONFIGS])
def test_hostile_config_is_refused_before_allocating(model_dir, case, request):
    override, field = HOSTILE_CONFIGS[case]
    if case == 0:
        proc = _cli(*_hostile_config(model_dir, override), limit_as=MEM_LIMIT, timeout=90)
    else:
        model_dir, proc = request.getfixturevalue("hostile_configs_in_one_process")[case]
    line = _one_error(proc, field)
    assert str(model_dir) in line


@pytest.mark.slow
def test_model_dir_loads_under_the_memory_limit(model_dir):  # the limit itself is not the cause
    proc = _cli("generate", "--checkpoint_path", str(model_dir), "--device", "cpu",
                "--max_new_tokens", "2", "--seed", "0", limit_as=MEM_LIMIT, timeout=90)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def _header_file(path: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("header, needle", [
    ({"tok_emb.weight": {"dtype": "F32", "shape": [300, 32], "data_offsets": [0, 10**12]}},
     "does not fit"),  # a header that lies about the data
    ({"tok_emb.weight": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, "dtype"),
    ({"tok_emb.weight": "nope"}, "malformed"),
])
def test_hostile_safetensors_header_is_refused(model_dir, header, needle):
    _header_file(model_dir / "model.safetensors", header, b"\0" * 64)
    with pytest.raises(CheckpointError, match=needle) as e:
        load_model(model_dir)
    assert "\n" not in str(e.value) and "model.safetensors" in str(e.value)


def test_huge_header_length_is_refused(model_dir):
    (model_dir / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        load_model(model_dir)


# --- 3. tokenizer vocabulary always checked ------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("vocab", [340, 300])
def test_config_without_tokenizer_hash_is_refused(tmp_path, tok_file, vocab, capsys):
    """Without a hash a foreign tokenizer.json was accepted when it was not larger than the
    embedding (issue 25, item 8): a model directory must name its tokenizer's hash."""
    other = tmp_path / "other.json"
    save_tokenizer(train_tokenizer(CORPUS * 3 + [" ".join(CORPUS)], vocab_size=vocab), other)
    d = _model_dir(tmp_path / "m", tok_file, vocab_size=400)
    config = json.loads((d / "config.json").read_text())
    del config["tokenizer_hash"]  # a config without a hash: the hash check cannot catch it
    (d / "config.json").write_text(json.dumps(config))
    (d / "tokenizer.json").write_bytes(other.read_bytes())
    proc = _cli_or_here(vocab == 340, capsys, "generate", "--checkpoint_path", str(d), "--device", "cpu",
                        "--max_new_tokens", "3")
    _one_error(proc, "config.json: no tokenizer_hash")


def test_tokenizer_of_another_size_than_recorded_is_refused(tmp_path, tok_file):
    d = _model_dir(tmp_path / "m", tok_file, vocab_size=320, tokenizer_vocab_size=320)
    with pytest.raises(CheckpointError, match="320-token tokenizer"):
        load_model(d)


# --- 4. torch floor -------------------------------------------------------------------------------

def test_torch_floor_excludes_cve_2025_32434():
    from packaging.requirements import Requirement

    text = (ROOT / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    torch_req = [Requirement(line.split("#")[0].strip().strip(",").strip('"'))
                 for line in deps.splitlines() if line.strip().startswith('"torch')]
    assert len(torch_req) == 1
    spec = torch_req[0].specifier
    assert not spec.contains("2.5.1") and spec.contains("2.6.0") and spec.contains("2.13.0")


# --- 5. export ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_export_into_its_own_model_directory_is_refused(model_dir, capsys):
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    for out in (model_dir, model_dir / "hf", model_dir.parent):
        proc = _cli_or_here(out == model_dir, capsys, "export", "--checkpoint_path", str(model_dir),
                            str(out))
        _one_error(proc, "outside the model directory")
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    load_model(model_dir)


@pytest.mark.slow
def test_export_is_atomic_and_leaves_no_stale_files(model_dir, tmp_path, capsys):
    from minigpt.export import EXPORT_FILES

    out = tmp_path / "hf"  # a first export (in this process); the two below run the real CLI
    assert _cli_here(capsys, "export", "--checkpoint_path", str(model_dir), str(out)).returncode == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    killed = tmp_path / f".hf.{os.getpid()}-deadbeef.tmp"  # what a killed export leaves behind
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    model, _, config = load_model(model_dir)  # another model (an edited config.json is refused)
    model.config.norm_eps = 1e-6
    save_model(model, model_dir, tokenizer_file=model_dir / "tokenizer.json",
               meta={k: config[k] for k in ("tokenizer_hash", "stage", "chat_template")})
    assert _cli("export", "--checkpoint_path", str(model_dir), str(out)).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    assert not killed.exists()
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == 1e-6
    assert first.keys() == {p.name for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")  # a directory the user keeps other things in
    _one_error(_cli("export", "--checkpoint_path", str(model_dir), str(out)), "other files")
    assert (out / "notes.txt").read_text() == "mine"


# --- 6. invalid UTF-8 from the user ---------------------------------------------------------------

def test_invalid_utf8_prompt_is_one_line_exit_2(model_dir):
    proc = _run([sys.executable, "-m", "minigpt.cli", "generate", "--checkpoint_path",
                 str(model_dir), "--device", "cpu", "--prompt", b"caf\xff"])
    _one_error(proc, "--prompt is not valid UTF-8", "0xff")


@pytest.mark.slow
def test_invalid_utf8_chat_line_is_one_line_exit_2(model_dir):
    proc = _cli("chat", "--checkpoint_path", str(model_dir), "--device", "cpu",
                "--max_new_tokens", "2", stdin=b"hello\n\xff\xfe oops\n")
    _one_error(proc, "stdin line 2 is not valid UTF-8", "0xff")


# --- 7. --max_new_tokens cap ----------------------------------------------------------------------

def test_max_new_tokens_is_capped(model_dir):
    proc = _cli("generate", "--checkpoint_path", str(model_dir), "--max_new_tokens", "1000000000",
                timeout=60)  # uncapped, this would run for days
    _one_error(proc, "--max_new_tokens", "must be <= 65536")
    assert "1..65536" in _cli("generate", "--help").stdout.decode()  # the documented maximum


# --- 8. the trainer dies with its parent; one writer per scratch directory ------------------------

LONG_RUN = {"max_steps": 10**6, "eval_interval": 10**6, "save_interval": 10**6}


def _wait_for_lock(project: Path, pid: int | None = None, timeout: float = 120) -> int:
    lock = project / "out/ckpt/pretrain/.lock"
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = lock.read_text().strip() if lock.exists() else ""
        if text.isdigit() and (pid is None or int(text) == pid):
            return int(text)
        time.sleep(0.2)
    raise AssertionError("the trainer never took its lock")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie has exited; only its exit status is left


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while not _gone(pid) and time.time() < deadline:
        time.sleep(0.2)
    return _gone(pid)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl")
def test_trainer_dies_with_its_parent_and_a_second_writer_is_refused(project):
    _set_params(project, pretrain=LONG_RUN)
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import subprocess, sys
            child = subprocess.Popen([sys.executable, {str(ROOT / 'stages/pretrain.py')!r}],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(child.pid, flush=True)
            child.wait()
        """)], cwd=project, env=_env(), stdout=subprocess.PIPE)
    trainer = int(parent.stdout.readline())
    try:
        _wait_for_lock(project, trainer)
        second = _stage(project, "pretrain.py", timeout=120)
        _one_error(second, f"pid {trainer}", "out/ckpt/pretrain")
        parent.kill()  # like `kill -9` of dvc repro
        parent.wait()
        assert _gone_within(trainer, 20), "the trainer outlived its parent"
    finally:
        if not _gone(trainer):
            os.kill(trainer, signal.SIGKILL)
    # and once the holder is gone, the lock is free again (the kernel dropped it)
    _set_params(project, pretrain={"max_steps": 1, "eval_interval": 1, "save_interval": 1})
    proc = _stage(project, "pretrain.py")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl")
def test_torchrun_worker_dies_when_the_command_above_torchrun_is_killed(project):
    """`dvc repro` -> torchrun -> trainer: killing the top leaves torchrun orphaned; the trainer
    sees its agent's parent change and stops (torchrun then exits too)."""
    _set_params(project, pretrain=LONG_RUN)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import subprocess, sys
            agent = subprocess.Popen([{torchrun!r}, "--standalone", "--nproc_per_node", "1",
                                      {str(ROOT / 'stages/pretrain.py')!r}],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(agent.pid, flush=True)
            agent.wait()
        """)], cwd=project, env=_env(), stdout=subprocess.PIPE)
    agent = int(parent.stdout.readline())
    trainer = None
    try:
        deadline = time.time() + 180
        while trainer is None and time.time() < deadline:  # the worker: the agent's child
            kids = [int(k) for t in Path(f"/proc/{agent}/task").glob("*")
                    for k in (t / "children").read_text().split()] if not _gone(agent) else []
            trainer = kids[0] if kids else None
            time.sleep(0.5)
        assert trainer is not None, "torchrun never started its worker"
        # Training: the worker holds the scratch lock, taken after setup_runtime armed its
        # parent watch (a fixed sleep waited here before, ~10 s longer on an idle machine).
        _wait_for_lock(project, trainer)
        parent.kill()
        parent.wait()
        assert _gone_within(trainer, 30), "the torchrun worker outlived the command that started torchrun"
    finally:
        for pid in (trainer, agent):
            if pid is not None and not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


# --- 9. encode sweeps stale temporary directories -------------------------------------------------

@pytest.mark.slow
def test_encode_sweeps_temp_dirs_of_killed_runs(project):
    tokens = project / "data/tokens"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = [tokens / ".pretrain.tmp-abc123", tokens / f".pretrain.tmp-{dead}-x1y2",
             tokens / f".pretrain.old-{dead}"]
    live = tokens / f".pretrain.tmp-{os.getpid()}-live"  # a running writer's (this test's)
    other = tokens / ".sft.tmp-abc123"  # another corpus: not this run's business
    for d in stale + [live, other]:
        d.mkdir()
        (d / "train.bin").write_bytes(b"\0" * 10)
    proc = _stage(project, "encode.py", "pretrain")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert not any(d.exists() for d in stale)
    assert live.exists() and other.exists()


# --- 10. encode memory is bounded by bytes ---------------------------------------------------------

def _varied_text(n_chars: int, seed: int = 0) -> str:
    """Prose with every whitespace pattern the pre-tokenizer cares about."""
    rng = np.random.default_rng(seed)
    seps = [" ", "  ", "\n", "\n\n", " \n", "\n ", "\t", " \t ", "   \n\n  ", "\u00a0", "\r\n"]
    words = WORDS + ["'s", "don't", "3.14", "1996–97", "日本語", "naïve", "!!", "(x)", "—", "😀"]
    parts, size = [], 0
    while size < n_chars:
        w = words[rng.integers(len(words))] + seps[rng.integers(len(seps))]
        parts.append(w)
        size += len(w)
    return "".join(parts)


def test_pieces_encode_to_exactly_the_whole_document(tok_file):
    from tokenizers import Tokenizer

    from minigpt.encode import encode_documents, split_text, token_dtype

    tok = Tokenizer.from_file(str(tok_file))
    texts = [_varied_text(60_000, seed) for seed in range(3)] + ["short", "", "x" * 5000]
    for text in texts:
        pieces = split_text(text, 500)
        assert "".join(pieces) == text
        if len(text) > 5000 and " " in text:
            assert len(pieces) > 100 and max(map(len, pieces)) <= 500
    dtype = token_dtype(tok.get_vocab_size())
    got = encode_documents(tok, texts, dtype, max_chars=500, batch_chars=3000)
    for text, ids in zip(texts, got):
        assert ids.tolist() == encode_text(tok, text)


MEM_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import minigpt.encode as enc
    enc.BATCH_BYTES, enc.PIECE_CHARS = 2**18, 2**16  # small caps, so a small test shows the bound
    src, tok, out = map(Path, sys.argv[1:4])
    base = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])  # kB
    enc.encode_corpus("pretrain", src, tok, out, 1000, splits=("train",))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    print(json.dumps({"growth_mb": (peak - base) / 1024}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_one_huge_document_encodes_in_bounded_memory(tmp_path, tok_file):
    src = tmp_path / "processed"
    src.mkdir()
    text = _varied_text(8 * 2**20)  # one 8 MB document: ~700 MB of Encodings if encoded whole
    (src / "train.jsonl").write_text(json.dumps({"text": text}) + "\n")
    proc = _run([sys.executable, "-c", MEM_SCRIPT, str(src), str(tok_file), str(tmp_path / "out")],
                timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    growth = json.loads(proc.stdout.decode().splitlines()[-1])["growth_mb"]
    # measured 340-680 MB here (shared machine); ~2000 MB when the document is encoded whole
    assert growth < 1000, f"peak RSS grew {growth:.0f} MB for one 8 MB document"
    from minigpt.encode import read_tokens
    from minigpt.tokenizer import EOT, load_tokenizer, special_id

    eot = special_id(load_tokenizer(tok_file), EOT)
    ids = read_tokens(tmp_path / "out" / "train")
    assert int(ids[-1]) == eot and int((ids == eot).sum()) == 1  # one document, one <|endoftext|>


# --- 11. silent wrong results ----------------------------------------------------------------------

def _process_txt(tmp_path: Path, data: bytes, name: str = "train.txt", **cfg) -> list[str]:
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    (raw / name).write_bytes(data)
    out = tmp_path / "processed"
    process_pretrain(PretrainDataConfig(source=str(raw), format="documents",
                                        validation_fraction=0.0, test_fraction=0.0, **cfg), out)
    return [json.loads(line)["text"] for line in (out / "train.jsonl").read_text().splitlines()]


def test_bom_is_not_text(tmp_path):
    docs = _process_txt(tmp_path, "\ufeffFirst line.\n\nSecond line.\n".encode())
    assert docs == ["First line.", "Second line."]
    raw = tmp_path / "raw2"
    raw.mkdir()
    (raw / "train.jsonl").write_bytes("\ufeff".encode() + b'{"text": "a b c"}\n')
    assert [r["text"] for r in read_records(raw / "train.jsonl", ["text"])] == ["a b c"]


def test_nul_characters_are_refused_with_the_line(tmp_path):
    with pytest.raises(DataError, match=r"train\.txt:2: NUL character"):
        _process_txt(tmp_path, b"fine\nbro\x00ken\n")
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"text": "a\\u0000b"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: column 'text' holds a NUL"):
        list(read_records(tmp_path / "x.jsonl", ["text"]))


@pytest.mark.parametrize("section", ["model", "pretrain", "process"])
def test_null_section_is_an_error_naming_it(tmp_path, section):
    (tmp_path / "params.yaml").write_text(f"{section}: null\n")
    with pytest.raises(ConfigError, match=rf"params\.yaml: {section}: is null"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(f"{section}:\n")  # the same thing, as people write it
    with pytest.raises(ConfigError, match=rf"{section}: is null"):
        load_params(tmp_path / "params.yaml")


# --- 12. precise messages ----------------------------------------------------------------------------

@pytest.mark.slow
def test_yaml_syntax_error_has_line_and_column(project):
    (project / "params.yaml").write_text("model:\n  n_layer: 1\n  n_head: [2\n  n_embd: 32\n")
    proc = _stage(project, "pretrain.py")
    line = _one_error(proc, "params.yaml:4:")
    assert "not valid YAML" in line


BAD_DEVICES = ["cpu:abc", "cuda:x", "gpu"]


@pytest.mark.slow
@pytest.mark.parametrize("device", BAD_DEVICES)
def test_bad_device_names_the_key(project, device, request):
    _set_params(project, pretrain={"device": device})
    proc = (_stage(project, "pretrain.py") if device == BAD_DEVICES[0]
            else _stage_here(project, request, "pretrain.py"))
    _one_error(proc, "pretrain.device", device)


def test_invalid_utf8_names_the_line(tmp_path):
    with pytest.raises(DataError, match=r"train\.txt:3: not UTF-8 text \(byte 0xff at column 4\)"):
        _process_txt(tmp_path, b"one\ntwo\nthr\xffee\n")
    (tmp_path / "a.json").write_bytes(b'[\n {"text": "x"},\n {"text": "\xc3"}\n]\n')
    with pytest.raises(DataError, match=r"a\.json:3: not UTF-8 text \(byte 0xc3"):
        list(read_records(tmp_path / "a.json", ["text"]))


def test_pretty_printed_json_objects_are_read(tmp_path):
    one = {"instruction": "Say hi.", "context": "", "response": "Hi!"}
    two = {"instruction": "Say bye.", "context": "", "response": "Bye!"}
    (tmp_path / "one.json").write_text(json.dumps(one, indent=2) + "\n")
    (tmp_path / "two.json").write_text(json.dumps(one, indent=4) + "\n" + json.dumps(two, indent=4))
    cols = ["instruction", "context", "response"]
    assert list(read_records(tmp_path / "one.json", cols)) == [one]
    assert list(read_records(tmp_path / "two.json", cols)) == [one, two]
    (tmp_path / "bad.json").write_text('{\n  "instruction": "x",\n  "response": \n}\n')
    with pytest.raises(DataError, match=r"bad\.json:4: invalid JSON"):
        list(read_records(tmp_path / "bad.json", cols))


def test_divergence_before_any_save_cites_no_missing_checkpoint(tmp_path):
    from minigpt.config import TrainConfig
    from minigpt.runtime import Runtime
    from minigpt.train import TrainingError, fit

    def windows():
        while True:
            x = torch.randint(0, 50, (2, 8))
            yield x, x

    class Source:
        it = windows()

        def next(self):
            return next(self.it)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8))
    model.norm.register_forward_hook(lambda m, a, out: out * float("nan") if m.training else out)
    c = TrainConfig(device="cpu", dtype="fp32", batch_size=2, max_steps=10, save_interval=5,
                    eval_interval=5, eval_batches=1, log_interval=1, warmup_steps=0)
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    with pytest.raises(TrainingError, match="at step 1") as e:
        fit(model, c, Runtime(device=torch.device("cpu"), dtype="fp32"), Source(),
            [next(windows())], model_dir=tmp_path / "m", ckpt_dir=tmp_path / "ckpt",
            curves_dir=tmp_path / "curves", meta={},
            tokenizer_file=tok)
    assert "no checkpoint of this run was saved yet" in str(e.value)
    assert "step 0" not in str(e.value)


# --- 13. file modes ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_model_files_get_ordinary_permissions(tmp_path, tok_file, project):
    old = os.umask(0o022)
    try:
        d = _model_dir(tmp_path / "m", tok_file)
        modes = {p.name: p.stat().st_mode & 0o777 for p in d.iterdir()}
        assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes
    finally:
        os.umask(old)
    proc = _stage(project, "pretrain.py")  # the stage's outputs and checkpoint too
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    for p in (project / "out/pretrain/model.safetensors", project / "out/ckpt/pretrain/model.safetensors"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~old, (p, oct(p.stat().st_mode))
    assert _cli("export", "--checkpoint_path", str(d), str(tmp_path / "hf")).returncode == 0
    assert (tmp_path / "hf/model.safetensors").stat().st_mode & 0o777 == 0o666 & ~old


# --- issue 25: model directories that lie, settings that are not numbers, faults in exports -------

def _edit_config(d: Path, **fields) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **fields}))


UNPINNED_EDITS = [("block_size", 16), ("qk_norm", True), ("logit_softcap", 30.0),
                  ("rope_theta", 500000.0), ("norm_eps", 1e-6)]


@pytest.mark.slow
@pytest.mark.parametrize("field,value", UNPINNED_EDITS)
def test_config_edit_that_no_weight_pins_is_refused(model_dir, field, value, capsys):
    """No tensor shape depends on these: the weights' metadata records what they were saved with."""
    _edit_config(model_dir, **{field: value})
    proc = _cli_or_here((field, value) == UNPINNED_EDITS[0], capsys, "generate", "--checkpoint_path",
                        str(model_dir), "--device", "cpu", "--max_new_tokens", "3", "--temperature", "0")
    _one_error(proc, "config.json", f"{field}=", "does not match the weights")


@pytest.mark.slow
def test_unknown_mlp_in_config_names_the_field_and_file(model_dir):
    _edit_config(model_dir, mlp="gelu")
    proc = _cli("generate", "--checkpoint_path", str(model_dir), "--device", "cpu", "--max_new_tokens", "3")
    _one_error(proc, "config.json", "mlp must be one of swiglu, relu2", "'gelu'")


@pytest.mark.parametrize("field,value", [("qk_norm", "yes"), ("zero_init", 1), ("logit_softcap", -1.0)])
def test_mistyped_architecture_flags_are_refused(model_dir, field, value):
    _edit_config(model_dir, **{field: value})
    with pytest.raises(CheckpointError, match=rf"config.json: not a GPT config \({field} "):
        load_model(model_dir)


def _diverged_dir(path: Path, tok_file: Path) -> Path:
    d = _model_dir(path, tok_file)
    model, _, config = load_model(d)
    with torch.no_grad():
        model.norm.weight.fill_(float("nan"))
    save_model(model, d, tokenizer_file=tok_file,
               meta={k: config[k] for k in ("tokenizer_hash", "stage", "chat_template")})
    return d


GREEDY_FLAGS = [["--temperature", "0"], ["--top_k", "1"], ["--temperature", "0", "--num_samples", "2"]]


@pytest.mark.slow
@pytest.mark.parametrize("flags", GREEDY_FLAGS)
def test_diverged_model_decoding_greedily_is_an_error(tmp_path, tok_file, flags, capsys):
    """Greedy decoding of NaN logits gave id 0 (empty text) and exit 0; sampling already erred."""
    d = _diverged_dir(tmp_path / "nan", tok_file)
    proc = _cli_or_here(flags == GREEDY_FLAGS[0], capsys, "generate", "--checkpoint_path", str(d),
                        "--device", "cpu", "--prompt", "the", "--max_new_tokens", "3", *flags)
    _one_error(proc, "cannot decode: the logits hold NaN or inf")


SAMPLING_FLAG_CASES = [
    ("generate", ["--temperature", "inf"], ["--temperature", "finite", "inf"]),
    ("generate", ["--temperature", "nan"], ["--temperature", "finite"]),
    ("chat", ["--repetition_penalty", "inf"], ["--repetition_penalty", "finite"]),
    ("generate", ["--repetition_penalty", "nan"], ["--repetition_penalty", "finite"]),
    ("generate", ["--seed", str(2**70)], ["--seed", "<= 18446744073709551615"]),
    ("chat", ["--seed", str(2**70)], ["--seed", "<= 18446744073709551615"]),
    ("generate", ["--seed", "-1"], ["--seed", ">= 0"]),
    ("generate", ["--num_samples", "200000"], ["--num_samples", "<= 256"]),
]


@pytest.mark.parametrize("command,flags,needles", SAMPLING_FLAG_CASES)
def test_out_of_range_sampling_flags_are_one_line(model_dir, command, flags, needles, capsys):
    first = next(c for c in SAMPLING_FLAG_CASES if c[0] == command)  # one real CLI per command
    proc = _cli_or_here((command, flags, needles) == first, capsys, command, "--checkpoint_path",
                        str(model_dir), "--device", "cpu", *flags)
    _one_error(proc, *needles)


@pytest.mark.slow
def test_largest_seed_works(model_dir):
    proc = _cli("generate", "--checkpoint_path", str(model_dir), "--device", "cpu", "--prompt", "the",
                "--max_new_tokens", "2", "--seed", str(2**64 - 1))
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_invalid_utf8_system_message_is_one_line(model_dir):
    proc = _run([sys.executable, "-m", "minigpt.cli", "chat", "--checkpoint_path", str(model_dir),
                 "--device", "cpu", "--system", b"be \xff brief"], stdin=b"hello\n")
    _one_error(proc, "--system is not valid UTF-8", "byte 0xff")


def _cli_with_file_limit(limit: int, *args) -> subprocess.CompletedProcess:
    """The CLI where no file may grow past `limit` bytes: writes fail as on a full disk (EFBIG)."""
    def pre():  # runs in the child before exec
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([sys.executable, "-m", "minigpt.cli", *args], env=_env(),
                          capture_output=True, timeout=120, preexec_fn=pre)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if "tmp" in p.name) if d.exists() else []


@pytest.mark.slow
def test_write_failure_during_hf_export_keeps_the_previous_export(model_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    # the previous export (in this process: a real CLI export is test_export_is_atomic_...'s)
    assert _cli_here(capsys, "export", "--checkpoint_path", str(model_dir), str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = _cli_with_file_limit(40_000, "export", "--checkpoint_path", str(model_dir), str(out))
    _one_error(proc, f"export to {out}", "model.safetensors: cannot write", "File too large")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_write_failure_during_gguf_export_leaves_no_tmp(model_dir, tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "gguf"
    proc = _cli_with_file_limit(40_000, "export", "--format", "gguf", "--dtype", "f32",
                                "--checkpoint_path", str(model_dir), str(out))
    _one_error(proc, f"export to {out}", "m-f32.gguf: cannot write (")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_disk_full_during_export_is_one_line(model_dir, tmp_path, monkeypatch, capsys, fmt):
    """ENOSPC itself, raised by the writer mid-file (after the file was opened and partly written)."""
    import errno

    from minigpt import cli

    if fmt == "gguf":
        gguf = pytest.importorskip("gguf")

        def full(self, *a, **kw):
            self.fout[0].write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    else:
        from safetensors import SafetensorError

        import minigpt.export

        def full(tensors, path, metadata=None):
            Path(path).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(minigpt.export, "save_file", full)
    out = tmp_path / "out"
    code = cli.main(["export", "--format", fmt, "--checkpoint_path", str(model_dir), str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert _leftovers(tmp_path) == _leftovers(out) == []
    assert not out.exists() or list(out.iterdir()) == []
