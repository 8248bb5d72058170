"""The asv suite stays quick by default (issue 10, point 8).

``asv run --quick`` runs every parameter combination of every benchmark once, each in
a fresh process that repeats its ``setup``; the default sizes keep that to a few
minutes on 2 cores, and ``SKMIXED_ASV_FULL=1`` opts into the long sizes. These checks
import the benchmark modules (without running them) and bound the combinations.
"""

import importlib
import itertools
import pkgutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_classes(monkeypatch, full):
    monkeypatch.setenv("SKMIXED_ASV_FULL", "1" if full else "")
    monkeypatch.syspath_prepend(str(ROOT / "asv_bench"))
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    pkg = importlib.import_module("benchmarks")
    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"benchmarks.{info.name}")
        for attr, obj in vars(mod).items():
            if isinstance(obj, type) and obj.__module__ == mod.__name__ and any(
                k.startswith(("time_", "peakmem_", "mem_")) for k in vars(obj)
            ):
                out[f"{info.name}.{attr}"] = obj
    return out


def _combinations(cls):
    params = getattr(cls, "params", [])
    if not params:
        return 1
    if not isinstance(params, tuple) and not (isinstance(params, list) and params and isinstance(params[0], list)):
        params = (params,)
    return len(list(itertools.product(*params)))


def test_quick_suite_is_small_and_full_suite_is_larger(monkeypatch):
    pytest.importorskip("skmixed")
    quick = _benchmark_classes(monkeypatch, full=False)
    assert quick, "no benchmarks found"
    n_quick = {k: _combinations(c) * sum(n.startswith(("time_", "peakmem_")) for n in vars(c)) for k, c in quick.items()}
    # a few minutes: bounded runs per class and overall (setups repeat per process)
    assert max(n_quick.values()) <= 16, n_quick
    assert sum(n_quick.values()) <= 90, n_quick
    full = _benchmark_classes(monkeypatch, full=True)
    n_full = {k: _combinations(c) for k, c in full.items()}
    assert sum(n_full.values()) > sum(_combinations(c) for c in quick.values())


def test_slow_setups_are_shared_and_bounded(monkeypatch):
    classes = _benchmark_classes(monkeypatch, full=False)
    transform = classes["bench_zinb.Transform"]
    assert hasattr(transform, "setup_cache") and getattr(transform, "timeout", 60) > 60


def test_gpu_check_script_runs_its_steps_on_the_cpu(tmp_path):
    """asv_bench/gpu_check.py (issue 14): the one call a lent GPU makes. Its dry run
    (tiny data, numpy) exercises every step and writes the table."""
    import subprocess

    out = tmp_path / "gpu.rst"
    run = subprocess.run([sys.executable, str(ROOT / "asv_bench" / "gpu_check.py"), "--dry-run", "--skip-tests",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    text = out.read_text()
    for step in ("many_genes", "offset", "resampling", "glmeiv", "zinbwave"):
        assert f"* - {step}" in text
    assert "failed" not in text and "did not finish" not in text
