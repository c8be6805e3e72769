"""The replica runs torch inductor's CPU ISA probe before its engine core forks (services/inference/isa_probe.py)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlbus.services.inference.isa_probe import IsaProbe, start_isa_probe

needs_x86_compiler = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="inductor's ISA probe builds x86 kernels with a C++ compiler",
)


def test_nothing_is_probed_for_an_eager_or_spawned_engine():
    assert start_isa_probe(engine_forked=False, compiled=True) is None
    assert start_isa_probe(engine_forked=True, compiled=False) is None


def test_a_failing_probe_is_only_logged(monkeypatch):
    from torch._inductor import cpu_vec_isa

    def broken() -> list:
        raise OSError("no compiler after all")

    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", broken)
    probe = IsaProbe().start()
    probe.join()  # the engine core then probes for itself
    assert probe.isas == []


def run_python(code: str, cache_dir: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python with its own inductor cache, where ``forbid_probes()`` makes any
    further probe raise (inductor's dlopen check of a test kernel)."""
    forbid = """
        from torch._inductor import cpu_vec_isa

        def probed(self, output_path):
            raise AssertionError("probed " + str(self))

        def forbid_probes():
            cpu_vec_isa.VecISA._probe_load = probed
    """
    environ = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    environ.pop("TORCHINDUCTOR_VEC_ISA_OK", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(forbid) + textwrap.dedent(code)], env=environ,
                          check=False, capture_output=True, text=True, timeout=300)  # fmt: skip


@needs_x86_compiler
def test_a_forked_engine_core_inherits_the_answers_and_probes_nothing(tmp_path):
    result = run_python("""
        import json, os
        from rlbus.services.inference.isa_probe import start_isa_probe

        probe = start_isa_probe(engine_forked=True, compiled=True)
        probe.join()
        forbid_probes()
        pid = os.fork()  # what vLLM does next with inference.fork_engine_core
        if pid == 0:
            same = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()] == probe.isas
            os._exit(0 if same else 3)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"isas": probe.isas, "child": os.waitstatus_to_exitcode(status),
                          "picked": str(cpu_vec_isa.pick_vec_isa())}))
    """, tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    # The child would have raised (exit 1) had it probed, or exited 3 with other answers.
    assert answer["child"] == 0
    assert answer["isas"] and answer["picked"] == answer["isas"][0]
    # A probe that ran checks the ISAs the CPU reports: AVX2 at least on the x86-64 machines we support.
    assert "avx2" in answer["isas"]


@needs_x86_compiler
def test_without_the_early_probe_the_child_would_probe(tmp_path):
    # The control: the same fork with no probe in the parent probes in the child (and fails here).
    result = run_python("""
        import os

        forbid_probes()
        pid = os.fork()
        if pid == 0:
            try:
                cpu_vec_isa.valid_vec_isa_list()
            except AssertionError:
                os._exit(7)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """, tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "7"
