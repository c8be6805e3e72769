"""The package layering, checked on the source: a service imports only ``rlbus`` (common/) and
itself; ``rlbus`` itself never imports a service, torch or vLLM; nothing imports the old top-level
``common`` / ``services`` names; pyproject's package list names every package folder.

Only the CLI entry (``services/cli.py``, ``services/entry.py``, ``services/eval.py``,
``services/synthesize/``), the
launcher, the merged run config and the run registry (``runs``) may cross services. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("env_worker", "inference", "monitor", "orchestrator", "trainer", "models")
CROSSING = ("cli.py", "entry.py", "eval.py", "synthesize", "keys.py", "plot.py", "launcher", "run_config", "runs")
# `python -m rlbus` must reach the CLI: the one import from rlbus (common/) into services.
COMMON_MAY_IMPORT_SERVICES = ("__main__.py",)
HEAVY = ("torch", "vllm", "transformers")


def imported_modules(path: Path, package: tuple[str, ...] = ()) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``path``, at any depth, in line order; relative imports
    are resolved against ``package`` (the dotted package ``path`` is in)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            found.append((node.lineno, ".".join((*base, *filter(None, [node.module])))))
    yield from sorted(found)


def package_of(path: Path, services_dir: Path) -> tuple[str, ...]:
    return ("rlbus", "services", *path.parent.relative_to(services_dir).parts)


def crossings(services_dir: Path, services: tuple[str, ...] = SERVICES) -> list[str]:
    """``file:line imports module`` for each import of another service from inside a service."""
    found = []
    for service in services:
        for path in sorted((services_dir / service).rglob("*.py")):
            for line, module in imported_modules(path, package_of(path, services_dir)):
                parts = module.split(".")
                if parts[:2] == ["rlbus", "services"] and parts[2:3] != [service]:
                    found.append(f"{path.relative_to(services_dir.parent)}:{line} imports {module}")
    return found


def test_no_service_imports_another_service_or_the_cli():
    assert crossings(ROOT / "services") == []


def test_the_check_catches_a_service_importing_another(tmp_path):
    # The same check on a tree where the orchestrator reaches into the env-worker and the launcher.
    (tmp_path / "services" / "orchestrator").mkdir(parents=True)
    (tmp_path / "services" / "orchestrator" / "eval.py").write_text(
        "def run():\n    from rlbus.services.env_worker.rollout import RolloutRunner\n"
        "from rlbus.services.launcher.config import service_env\nfrom rlbus.services.orchestrator import core\n"
        "from ..trainer import losses\nfrom . import journal\n"
    )
    assert crossings(tmp_path / "services", ("orchestrator",)) == [
        "services/orchestrator/eval.py:2 imports rlbus.services.env_worker.rollout",
        "services/orchestrator/eval.py:3 imports rlbus.services.launcher.config",
        "services/orchestrator/eval.py:5 imports rlbus.services.trainer",
    ]


def test_every_services_entry_is_a_service_or_a_known_crossing_module():
    entries = {p.name for p in (ROOT / "services").iterdir() if p.name not in ("__init__.py", "__pycache__")}
    assert entries <= set(SERVICES) | set(CROSSING), sorted(entries - set(SERVICES) - set(CROSSING))


def test_common_imports_no_service_and_nothing_heavy():
    found = []
    for path in sorted((ROOT / "common").rglob("*.py")):
        for line, module in imported_modules(path):
            top = module.split(".")
            heavy = top[0] in HEAVY
            service = top[:2] == ["rlbus", "services"] and path.name not in COMMON_MAY_IMPORT_SERVICES
            if heavy or service:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert found == []


def test_nothing_imports_the_old_top_level_names():
    found = []
    for folder in ("common", "services", "scripts", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "test_legacy_paths.py":
                continue  # imports the old names on purpose
            for line, module in imported_modules(path):
                if module.split(".")[0] in ("common", "services"):
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert found == []


def test_pyproject_lists_every_package_folder():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"rlbus"}
    for base, prefix in (("common", "rlbus"), ("services", "rlbus.services")):
        for init in (ROOT / base).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / base).parts
            folders.add(".".join((prefix, *relative)))
    assert listed == folders
