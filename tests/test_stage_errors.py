"""Training stages fail in one line and write outputs that are a function of deps and params
(issue 25: items 6, 9, 10's training points, 11).

Each test runs `python stages/pretrain.py` (or the real torchrun launcher) in a temporary project
built by tests/test_hostile.py's fixtures, the way DVC runs it, and checks what the user sees:
exit status 2 and one `error:` line naming the key or file, or byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from test_hostile import (ROOT, _env, copy_of, _one_error, _set_params, _stage, _stage_here,  # noqa: F401
                          project, project_template, tok_file)

pytestmark = pytest.mark.slow  # every test starts a stage process (some under torchrun)


@pytest.fixture(scope="module")
def trained_template(project_template, tmp_path_factory) -> Path:
    """project_template after one finished `python stages/pretrain.py`: its model directory,
    checkpoint and metrics, for the tests that start from a finished run (one run, not one each)."""
    root = copy_of(project_template, tmp_path_factory.mktemp("trained"))
    proc = _stage(root, "pretrain.py")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return root


@pytest.fixture
def trained(trained_template, tmp_path) -> Path:
    return copy_of(trained_template, tmp_path)


def _tree(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


# --- item 6: a model directory is a function of deps and params ------------------------------------

def test_identical_params_give_a_byte_identical_model_directory(trained):
    project = trained  # after a first, finished run of the stage
    one = _tree(project / "out/pretrain")
    config = json.loads((project / "out/pretrain/config.json").read_text())
    timings = {"tokens_per_s", "mfu", "train_time_s", "time_s", "resumed_from_step"}
    assert not timings & set(config["training"]), config["training"]
    metrics = json.loads((project / "metrics/pretrain.json").read_text())
    assert timings <= set(metrics), metrics  # the timings live in the (uncached) metrics
    # `dvc repro --force` with the scratch kept: resumes the finished run (other timings) ...
    again = _stage(project, "pretrain.py")
    assert again.returncode == 0 and b"resuming from" in again.stdout
    assert _tree(project / "out/pretrain") == one
    # ... and without it: a fresh run on another session
    import shutil
    shutil.rmtree(project / "out")
    fresh = _stage(project, "pretrain.py")
    assert fresh.returncode == 0, fresh.stderr.decode()[-2000:]
    assert _tree(project / "out/pretrain") == one


# --- item 10: training errors name the key or the file ---------------------------------------------

NON_FINITE = [(".inf", "inf"), (".nan", "nan"), ("-.inf", "-inf")]


@pytest.mark.parametrize("value,shown", NON_FINITE)
def test_non_finite_float_is_refused_at_load(project, value, shown, request):
    text = (project / "params.yaml").read_text().replace("pretrain:\n", "pretrain:\n  lr: " + value
                                                         + "\n", 1)
    (project / "params.yaml").write_text(text)
    proc = (_stage(project, "pretrain.py") if (value, shown) == NON_FINITE[0]
            else _stage_here(project, request, "pretrain.py"))  # the same rule, in this process
    _one_error(proc, "pretrain.lr: must be a finite number", shown)


def test_a_batch_that_cannot_fit_is_refused_before_allocating(project):
    _set_params(project, pretrain={"batch_size": 10**7})  # ~ 15 TB of activations
    proc = _stage(project, "pretrain.py", timeout=120)
    line = _one_error(proc, "pretrain.batch_size: 10000000 sequences of 16 tokens need at least",
                      "pretrain.grad_accum")
    assert "GiB is available" in line
    assert not (project / "out/pretrain").exists()


def test_tampered_state_pt_is_not_resumed(trained):
    """state.pt replaced by a pickle that weights_only refuses, its hash updated in meta.json:
    like every other torn checkpoint, the stage says why it does not resume and starts fresh."""
    project = trained  # a finished run
    ckpt = project / "out/ckpt/pretrain"
    torch.save({"step": 2, "payload": Path("/etc/passwd")}, ckpt / "state.pt")  # not plain data
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["state.pt"]["sha256"] = hashlib.sha256((ckpt / "state.pt").read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))
    proc = _stage(project, "pretrain.py")
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err[-2000:]
    line = next(x for x in out.splitlines() if x.startswith("not resuming"))
    assert "state.pt: refused, it holds objects other than tensors" in line, line
    assert line.endswith("; starting fresh") and "weights_only=False" not in out + err


_FULL_DISK = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), like ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = [{script!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_last_one(trained):
    project = trained  # a finished run: its checkpoint and model directory must survive
    ckpt = project / "out/ckpt/pretrain"
    before, model_before = _tree(ckpt), _tree(project / "out/pretrain")
    _set_params(project, pretrain={"seed": 7})  # another run: starts fresh, saves at step 2
    limit = (ckpt / "model.safetensors").stat().st_size // 2  # the curves fit, the weights do not
    code = _FULL_DISK.format(limit=limit, script=str(ROOT / "stages/pretrain.py"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, env=_env(),
                          capture_output=True, timeout=180)
    line = _one_error(proc, "out/ckpt/pretrain: checkpoint of step 2 not saved (writing ",
                      "File too large", "the previous checkpoint is kept")
    err = proc.stderr.decode()
    assert err.endswith(line + "\n") and "\n" + line in err  # on its own line, not in the bar's
    assert _tree(ckpt) == before  # nothing written over, no temporary left
    assert _tree(project / "out/pretrain") == model_before


# --- item 9: under torchrun, still one line and exit 2 ----------------------------------------------

def _dvc_cmd(project: Path, stage: str = "pretrain", **kw) -> subprocess.CompletedProcess:
    return subprocess.run(_dvc_args(project, stage), cwd=project, env=_env(), capture_output=True,
                          **kw)


def _dvc_args(project: Path, stage: str = "pretrain") -> list[str]:
    """The stage's command exactly as dvc.yaml gives it to DVC (params interpolated)."""
    import shlex

    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    nproc = yaml.safe_load((project / "params.yaml").read_text())[stage].get("nproc", 1)
    exe = {"python": sys.executable, "torchrun": str(Path(sys.executable).with_name("torchrun"))}
    return [exe.get(a, str(ROOT / a) if a.startswith("stages/") else a)
            for a in shlex.split(cmd.replace("${%s.nproc}" % stage, str(nproc)))]


def test_torchrun_launch_keeps_one_line_and_status_2(project):
    """`pretrain.nproc: 2` runs two DDP workers (gloo, CPU) through torchrun's launcher; an error
    in the workers is one line, exit 2, no ChildFailedError traceback; bad params fail before
    any worker starts; and a good run trains with world size 2."""
    _set_params(project, pretrain={"nproc": 2, "warmup_steps": 1})
    (project / "data/tokens/pretrain/validation.bin").unlink()
    proc = _dvc_cmd(project, timeout=240)
    err = proc.stderr.decode()
    line = _one_error(proc, "validation")
    assert "ChildFailedError" not in err and "torch.distributed" not in err, err[-3000:]
    assert err.strip() == line, err[-3000:]  # nothing else: no torchrun log lines
    assert line.startswith("error: data/tokens/pretrain/validation.bin"), line  # as rank 0's


def test_torchrun_launch_reports_bad_params_before_starting_workers(project):
    _set_params(project, pretrain={"nproc": 2, "lr": -1})
    proc = _dvc_cmd(project, timeout=60)
    line = _one_error(proc, "params.yaml: pretrain.lr: must be > 0")
    assert proc.stderr.decode().strip() == line


def test_torchrun_launch_trains_with_two_workers(project):
    _set_params(project, pretrain={"nproc": 2})
    proc = _dvc_cmd(project, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert b"2 process(es)" in proc.stdout
    config = json.loads((project / "out/pretrain/config.json").read_text())
    assert config["training"]["world_size"] == 2


def test_a_killed_worker_is_reported_in_one_line(project):
    """A worker that dies without a word (SIGKILL, the OOM killer) is named with its signal."""
    _set_params(project, pretrain={"nproc": 2, "max_steps": 10**6, "save_interval": 10**6,
                                   "eval_interval": 10**6, "log_interval": 10**6})
    code = textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        proc = subprocess.Popen({_dvc_args(project)!r},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 200
        victim = None
        while victim is None and time.time() < deadline:  # a worker: the launcher's child
            kids = open(f"/proc/{{proc.pid}}/task/{{proc.pid}}/children").read().split()
            victim = int(kids[-1]) if len(kids) == 2 else None
            time.sleep(0.5)
        lock = "out/ckpt/pretrain/.lock"  # rank 0 takes it once both workers joined the group
        while time.time() < deadline and not (os.path.exists(lock) and open(lock).read().strip()):
            time.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        err = proc.stderr.read().decode()
        sys.stdout.write(str(proc.wait()) + "\\n" + err)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, env=_env(),
                          capture_output=True, timeout=300)
    status, _, err = proc.stdout.decode().partition("\n")
    lines = [x for x in err.splitlines() if x.startswith("error")]
    assert status == "2" and len(lines) == 1 and "Traceback" not in err, (status, err[-3000:])
    assert "killed by SIGKILL" in lines[0], lines


# --- item 11: cross-section params -----------------------------------------------------------------

def test_eval_stride_beyond_block_size_fails_before_training(project):
    _set_params(project, eval={"stride": 128})  # the default stride, a 16-token block
    line = _one_error(_stage(project, "pretrain.py"), "eval.stride", "model.block_size (16)")
    assert "128" in line
    assert not (project / "out").exists()


# --- item 11: a failed `dvc repro` leaves no git-trackable output behind -----------------------------

def test_outputs_under_metrics_stay_ignored_after_a_failed_repro(tmp_path):
    """DVC writes an out's .gitignore entry when it saves the stage, and a command that fails
    takes back every entry it wrote (dvc/repo/scm_context.py), so after `dvc repro` fails at
    finetune, metrics/pretrain/ (saved, cached) is no longer ignored; `git add metrics` (the
    natural way to keep the metrics JSON) then made every later run fail "already tracked by
    SCM". The repo's own .gitignore covers the cached outs under metrics/, like data/ and out/."""
    import random
    import shutil

    from test_pipeline import (TINY_PARAMS, _dolly_file, _dvc, _run, _set_params as set_pipeline_params,
                               _wikitext_file, copy_project)

    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    rng = random.Random(0)
    for d in ("raw/pretrain", "raw/sft"):
        (repo / d).mkdir(parents=True)
    for split, n in (("train", 20), ("valid", 3), ("test", 3)):
        _wikitext_file(repo / f"raw/pretrain/wiki.{split}.raw", n, rng)
    _dolly_file(repo / "raw/sft/dolly.jsonl", 60, rng)
    set_pipeline_params(repo, TINY_PARAMS)
    set_pipeline_params(repo, {"finetune": {"device": "cuda:99"}})  # fails at finetune only
    _run(repo, "git", "init", "-q", "-b", "main")
    _dvc(repo, "init", "-q")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "fixture")
    failed = _dvc(repo, "repro", "finetune", check=False)
    assert failed.returncode != 0 and "cuda:99" in failed.stderr, failed.stderr[-2000:]
    assert (repo / "metrics/pretrain/train.tsv").is_file()
    _run(repo, "git", "add", "metrics")  # keep the metrics JSON, as a user would
    tracked = _run(repo, "git", "ls-files", "metrics").stdout.split()
    assert tracked == ["metrics/pretrain.json"], tracked
    _run(repo, "git", "commit", "-qm", "metrics of the failed run")
    set_pipeline_params(repo, {"finetune": {"device": "cpu"}})
    # the next experiment re-trains the pre-trained model, so DVC saves metrics/pretrain again
    again = _dvc(repo, "exp", "run", "-S", "pretrain.seed=7", "finetune", check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Running stage 'pretrain'" in again.stdout
