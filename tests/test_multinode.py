"""Several machines: two torchrun launchers on this box as two "nodes" (c10d rendezvous on
127.0.0.1, gloo, one process each) train exactly like one process with the same global batch,
the README's multi-node commands in miniature."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from test_train import BLOCK, DDP_CFG, DDP_SCRIPT, ROOT, cfg, data, one_thread, run_fit, weights  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None or not sys.platform.startswith("linux"),
                    reason="needs torchrun")
def test_two_nodes_with_c10d_rendezvous_match_one_process(data):
    single = run_fit(data, cfg(batch_size=4, **DDP_CFG), out="single")
    script = data["root"] / "ddp.py"
    script.write_text(DDP_SCRIPT)
    c = repr(dataclasses.asdict(cfg(batch_size=2, **DDP_CFG)))  # 2 nodes x 1 process x 2 rows
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    nodes = [subprocess.Popen(
        ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", endpoint, "--rdzv-id", "minigpt-test", "--local-addr", "127.0.0.1",
         str(script), str(ROOT), str(data["root"]), c],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        logs = [node.communicate(timeout=120)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    a, b = weights(data["root"] / "single"), weights(data["root"] / "ddp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    import json

    m = json.loads((data["root"] / "ddp" / "metrics.json").read_text())
    assert m["tokens"] == single["tokens"] == DDP_CFG["max_steps"] * 4 * BLOCK
    assert m["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)
