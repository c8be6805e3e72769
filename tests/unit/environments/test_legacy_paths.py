"""The environment API's old import path (``services.env_worker.environment``, ``.tools``,
``.registry``, ``.envs.<name>``) keeps working for one release, with a DeprecationWarning, and
never shadows somebody else's top-level ``services`` package.

Each case runs in a fresh interpreter outside the checkout, as an installed rlbus is used: there
the only ``services`` is the one a user may have installed themselves.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def run_python(code: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pythonpath) if pythonpath else ""}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_old_paths_warn_and_give_the_same_objects(tmp_path):
    result = run_python("""
        import warnings
        import rlbus.environments as new
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from services.env_worker.environment import Environment, Rubric
            from services.env_worker.tools import ToolEnvironment
            from services.env_worker.envs.reverse_text import load_environment
        assert Environment is new.Environment and Rubric is new.Rubric and ToolEnvironment is new.ToolEnvironment
        assert load_environment(num_examples=3).num_examples == 3
        messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
        assert any("'services.env_worker.environment' is deprecated" in m and "rlbus.environments" in m
                   for m in messages), messages
        print("ok", len(messages))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_an_environment_written_against_the_old_path_loads(tmp_path):
    (tmp_path / "old_style_env.py").write_text(textwrap.dedent("""
        from services.env_worker.environment import Environment, Rubric

        def load_environment():
            return Environment([{"prompt": "hi", "answer": "1"}], Rubric([lambda completion: 1.0]))
    """))
    result = run_python("""
        import rlbus.environments
        import old_style_env
        env = old_style_env.load_environment()
        assert isinstance(env, rlbus.environments.Environment) and env.num_examples == 1
        print("ok")
    """, tmp_path, pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr


def test_someone_elses_services_package_is_not_shadowed(tmp_path):
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "__init__.py").write_text("OWNER = 'another distribution'\n")
    result = run_python("""
        import rlbus.environments
        import services
        assert services.OWNER == "another distribution", services
        from services.env_worker.environment import Environment
        assert Environment is rlbus.environments.Environment
        print("ok")
    """, tmp_path, pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr


def test_without_rlbus_the_old_top_level_names_are_not_installed(tmp_path):
    result = run_python("import importlib.util; print(importlib.util.find_spec('services'), "
                        "importlib.util.find_spec('common'))", tmp_path)
    assert result.stdout.strip() == "None None", result.stdout + result.stderr
