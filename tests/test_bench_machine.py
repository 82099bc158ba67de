"""bench/machine_checks.py, which holds the suite's machine-dependent checks, runs and reports in
the bench format (its verdicts depend on the machine, so only the report is checked here)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("machine_checks", ROOT / "bench" / "machine_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gemm_peak_check_reports_a_ratio(capsys):
    assert _bench().main(["gemm_peak"]) in (0, 1)
    out = capsys.readouterr().out
    assert re.search(r"^gemm_peak: 1024\^3 fp32 GEMM [\d.]+ GFLOP/s .* ratio \d+\.\d\dx \((ok|FAIL)", out), out


def test_unknown_check_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        _bench().main(["gemm"])
    assert exit_.value.code == 2 and "unknown check 'gemm'" in capsys.readouterr().err
