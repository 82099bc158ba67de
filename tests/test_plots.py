"""`minigpt plots`: real dvc experiments in a temp git repo, rendered offline, opened in Chromium.

The repo holds the project's own top-level `plots:` (dvc.yaml) and a one-line stage that writes
the two stages' TSV curves from `finetune.lr`, so two `dvc exp run -S` give two experiments with
different curves in seconds. The page is then loaded in headless Chromium with every host
unresolvable and a dead proxy (no network), and its DOM must hold both experiments' lines.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # `minigpt plots` processes and headless Chromium

ROOT = Path(__file__).resolve().parents[1]
CURVES = '''import pathlib, yaml
lr = yaml.safe_load(open("params.yaml"))["finetune"]["lr"]
for stage in ("pretrain", "finetune"):
    d = pathlib.Path("metrics") / stage
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.tsv").write_text("step\\tloss\\n" + "".join(
        f"{s}\\t{5 / (1 + lr * 1000 * s):.4f}\\n" for s in range(1, 11)))
    (d / "val.tsv").write_text("step\\tval_loss\\n" + "".join(
        f"{s}\\t{5.5 / (1 + lr * 900 * s):.4f}\\n" for s in (0, 5, 10)))
'''
EXPS = ("lr-high", "lr-low")


def _run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                             f"\n{proc.stderr[-2000:]}")
    return proc


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(cwd, sys.executable, "-m", "dvc", *args)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    pytest.importorskip("vl_convert", reason='vl-convert-python missing (pip install "minigpt[plots]")')
    repo = tmp_path_factory.mktemp("plots")
    (repo / "curves.py").write_text(CURVES)
    (repo / "params.yaml").write_text("finetune:\n  lr: 0.001\n")
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]  # the project's own curves
    stage = {"cmd": "python curves.py", "deps": ["curves.py"], "params": ["finetune"],
             "outs": ["metrics/pretrain", "metrics/finetune"]}  # as in dvc.yaml
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"curves": stage}, "plots": plots},
                                                  sort_keys=False))
    _run(repo, "git", "init", "-q", "-b", "main")
    _dvc(repo, "init", "-q")
    _dvc(repo, "repro", "-q")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "baseline")
    for name, lr in zip(EXPS, ("0.004", "0.0003")):
        _dvc(repo, "exp", "run", "-q", "-n", name, "-S", f"finetune.lr={lr}")
    _run(repo, "git", "checkout", "-q", "--", ".")  # workspace back at the baseline (lr 0.001)
    _dvc(repo, "repro", "-q")
    return repo


def _plots(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(repo, sys.executable, "-m", "minigpt.cli", "plots", *args, check=check)


@pytest.fixture(scope="module")
def plotted(repo) -> tuple[Path, subprocess.CompletedProcess]:
    """`minigpt plots` of both experiments, once: its output directory is checked on disk and
    opened in the browser."""
    return repo / "out", _plots(repo, "--exp", EXPS[0], "--exp", EXPS[1], "--out", "out")


def test_plots_writes_pngs_and_a_self_contained_page(plotted):
    out, proc = plotted
    assert "self-contained" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["finetune_loss.png", "index.html",
                                                     "pretrain_loss.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    page = (out / "index.html").read_text()
    assert "<script" not in page.lower()
    # nothing to fetch: the only URLs are XML namespace names, never loaded
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls
    for name in ("workspace", *EXPS):
        assert f">{name}</text>" in page  # one legend entry per revision, in each plot


def test_plots_errors_are_one_line(repo):
    proc = _plots(repo, "--exp", "no-such-exp", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no-such-exp" in err[0], proc.stderr


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


OFFLINE_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9"]


def test_page_draws_both_experiments_in_headless_chromium_offline(plotted, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run does it)")
    out, _ = plotted
    url = (out / "index.html").as_uri()
    base = [browser, *OFFLINE_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert html.count("<svg") == 2  # both plots drawn
    # each line is a path with real geometry (several points), labelled with its revision and
    # curve: 3 revisions x {train loss, val loss} in each of the 2 plots
    lines = re.findall(r'<path aria-label="[^"]*rev: ([^;"]+); filename::field: ([^;"]+)"'
                       r'[^>]*aria-roledescription="line mark"[^>]*\bd="M[\d.,-]+(?:L[\d.,-]+){2,}"',
                       html)
    drawn = {(rev, curve) for rev, curve in lines}
    assert drawn == {(rev, curve) for rev in ("workspace", *EXPS)
                     for curve in ("train.tsv::loss", "val.tsv::val_loss")}, drawn
    assert len(lines) >= 12, len(lines)
    for name in ("workspace", *EXPS):
        assert html.count(f">{name}</text>") == 2, name  # a legend entry in each plot
    shot = tmp_path / "shot.png"
    run = subprocess.run([*base, "--window-size=1000,1700", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", run.stderr[-2000:]
    assert shot.stat().st_size > 30_000  # a blank page is a few KB
    keep = os.environ.get("MINIGPT_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_plots_say_which_curves_and_points_are_not_drawn(tmp_path):
    """A missing curve file, a missing column and non-number cells were dropped without a word."""
    pytest.importorskip("vl_convert", reason='vl-convert-python missing (pip install "minigpt[plots]")')
    repo = tmp_path / "r"
    (repo / "metrics/pretrain").mkdir(parents=True)
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    (repo / "metrics/pretrain/train.tsv").write_text("step\tloss\n1\t5.0\n2\tnan\n3\t\n4\t4.0\n")
    (repo / "metrics/pretrain/val.tsv").write_text("step\tval_loss\n0\t5.5\n5\tabc\n")
    _run(repo, "git", "init", "-q", "-b", "main")
    _dvc(repo, "init", "-q")
    proc = _plots(repo, "--out", "out")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: finetune_loss: workspace: metrics/finetune/train.tsv not drawn ([Errno 2] No such "
        "file or directory: 'metrics/finetune/train.tsv')",
        "warning: finetune_loss: workspace: metrics/finetune/val.tsv not drawn ([Errno 2] No such "
        "file or directory: 'metrics/finetune/val.tsv')",
        "warning: pretrain_loss: workspace: train.tsv::loss: 2 of 4 points not drawn (not numbers: "
        "'nan', '')",
        "warning: pretrain_loss: workspace: val.tsv::val_loss: 1 of 2 points not drawn (not "
        "numbers: 'abc')",
    ], proc.stderr
    assert (repo / "out/pretrain_loss.png").exists()
    (repo / "metrics/pretrain/val.tsv").write_text("step\tother\n0\t5.5\n")  # no val_loss column
    proc = _plots(repo, "--out", "out", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: nothing to plot: pretrain_loss: workspace: a curve not "
                                  "drawn (Could not find provided field ('val_loss')"), proc.stderr
