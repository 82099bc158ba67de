"""Several machines, as the README's "GPUs and machines" section runs them: the pretrain stage under
two torchrun launchers on this box as two "nodes" (c10d rendezvous on 127.0.0.1, gloo, one process
each), outside `dvc repro`, then `dvc commit`. The weights equal a single-node `dvc repro` of the
same global batch, and DVC then treats the stage as up to date."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_pipeline import (ROOT, TINY_PARAMS, _dolly_file, _dvc, _run, _set_params, _stale, _wikitext_file,
                           copy_project)

pytestmark = pytest.mark.slow  # two torchrun launchers and `dvc repro`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun") is None or not sys.platform.startswith("linux"),
                    reason="needs torchrun")
def test_two_nodes_with_c10d_rendezvous_match_one_node_and_dvc_commit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    rng = random.Random(0)
    (repo / "raw/pretrain").mkdir(parents=True)
    (repo / "raw/sft").mkdir(parents=True)
    for split, articles in (("train", 30), ("valid", 4), ("test", 4)):
        _wikitext_file(repo / f"raw/pretrain/wiki.{split}.raw", articles, rng)
    _dolly_file(repo / "raw/sft/dolly.jsonl", 40, rng)
    _set_params(repo, TINY_PARAMS)
    _set_params(repo, {"pretrain": {"dtype": "fp32", "batch_size": 4}})  # fp32: exact on any CPU
    _run(repo, "git", "init", "-q", "-b", "main")
    _dvc(repo, "init", "-q")
    _dvc(repo, "add", "-q", "raw/pretrain", "raw/sft")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "fixture")

    _dvc(repo, "repro", "pretrain")  # one node, one process, 4 rows a step
    single = load_file(repo / "out/pretrain/model.safetensors")

    # Two nodes x one process x 2 rows: the same global batch. The README's commands, per node.
    _set_params(repo, {"pretrain": {"batch_size": 2}})
    shutil.rmtree(repo / "out/ckpt")  # another run's scratch (it would not be resumed anyway)
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    nodes = [subprocess.Popen(
        ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", endpoint, "--rdzv-id", "minigpt-pretrain", "--local-addr", "127.0.0.1",
         "stages/pretrain.py"],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        logs = [node.communicate(timeout=180)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert sum("pretrain: val loss" in log for log in logs) == 1  # rank 0's node reports and writes
    assert any("2 process(es)" in log for log in logs)
    multi = load_file(repo / "out/pretrain/model.safetensors")
    for k in single:
        torch.testing.assert_close(single[k], multi[k], rtol=0, atol=1e-5)

    assert "pretrain" in _stale(repo)  # params changed, outputs not yet recorded
    _dvc(repo, "commit", "-f", "pretrain")
    assert "pretrain" not in _stale(repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["pretrain"]["params"]["params.yaml"]["pretrain"]["batch_size"] == 2
    assert "Running stage 'pretrain'" not in _dvc(repo, "repro", "pretrain").stdout
