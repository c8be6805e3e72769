"""The pre-0.2 import paths of the environment API, kept for one release.

Environments written before the API moved import it as
``services.env_worker.environment`` (or ``.tools``, ``.registry``,
``.envs.<name>``). Those names were top-level packages called ``services``,
which any other installed ``services`` package could shadow, so rlbus no longer
installs them. :func:`install_legacy_aliases` (run when
:mod:`rlbus.environments` is imported, as it always is before the env-worker or
the orchestrator loads an environment) maps exactly those module names to their
new homes and warns once per name. A real top-level ``services`` package,
if one is installed, keeps its own name: only the legacy leaf modules are
served from here.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

REMOVED_IN = "0.3"
# Old module name -> new module name.
ALIASES = {
    "services.env_worker.environment": "rlbus.environments.base",
    "services.env_worker.tools": "rlbus.environments.tools",
    "services.env_worker.registry": "rlbus.environments.registry",
    "services.env_worker.envs": "rlbus.environments.builtin",
}
# Parents of the old names, made as empty packages when no real package has their name.
PARENTS = ("services", "services.env_worker")


def new_name(old: str) -> str | None:
    """Where ``old`` lives now (``services.env_worker.envs.reverse_text`` included); None if not legacy."""
    for prefix, target in ALIASES.items():
        if old == prefix or old.startswith(prefix + "."):
            return target + old[len(prefix):]
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str | None) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        if self.target is None:  # an empty parent package
            module = types.ModuleType(spec.name)
            module.__path__ = []
            return module
        warnings.warn(f"'{spec.name}' is deprecated and goes away in rlbus {REMOVED_IN}: import "
                      f"'{self.target}' (or 'rlbus.environments') instead", DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.target)

    def exec_module(self, module: types.ModuleType) -> None:
        """The module is the new one, already executed."""


class LegacyFinder(importlib.abc.MetaPathFinder):
    """Serves the old environment module names from their new homes."""

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:  # fmt: skip
        if fullname in PARENTS:
            if self._real_package_exists(fullname):
                return None
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader(None), is_package=True)
        moved = new_name(fullname)
        spec = importlib.util.find_spec(moved) if moved is not None else None
        if spec is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(moved),
                                              is_package=spec.submodule_search_locations is not None)

    def _real_package_exists(self, name: str) -> bool:
        # Ask the other finders only: a real package of this name (ours in a source checkout,
        # or somebody else's) is imported as it is.
        parent = sys.modules.get(name.rpartition(".")[0]) if "." in name else None
        search = getattr(parent, "__path__", None) if parent is not None else None
        if "." in name and not search:
            return False
        return importlib.machinery.PathFinder.find_spec(name, search) is not None


def install_legacy_aliases() -> None:
    """Put the finder first on ``sys.meta_path`` (once per process)."""
    if not any(isinstance(finder, LegacyFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, LegacyFinder())
