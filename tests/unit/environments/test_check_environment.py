"""``check_environment``: what ``load_environment`` would refuse, found without building anything."""

from __future__ import annotations

import sys
import types
from importlib.metadata import EntryPoint

import pytest

from rlbus.environments import UnknownEnvironmentError, check_environment
from rlbus.environments.builtin import reverse_text


def test_unknown_ids_and_prefixes_are_their_own_error() -> None:
    with pytest.raises(UnknownEnvironmentError, match="did you mean 'reverse-text'"):
        check_environment("revers-text")
    with pytest.raises(UnknownEnvironmentError, match="no loader for the prefix 'nosuch:'"):
        check_environment("nosuch:env")
    check_environment("verifiers:anything", {"any": 1})  # the prefix's loader takes any arguments


def test_arguments_bind_to_the_loader_and_pass_its_validate_args() -> None:
    with pytest.raises(ValueError, match=r"\['min_wordz'\] \(did you mean 'min_words'\?\)"):
        check_environment("reverse-text", {"min_wordz": 2})
    with pytest.raises(ValueError, match="'reverse-text' refuses these arguments: .*min_words=5, max_words=4"):
        check_environment("reverse-text", {"min_words": 5})  # max_words comes from the loader's default
    check_environment("reverse-text", {"min_words": 2, "max_words": 3})
    check_environment("arithmetic", {"num_examples": 4})  # no validate_args: binding is the check


def test_validate_args_gets_every_argument_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    module = types.ModuleType("fake_env_module")

    def load_environment(size: int = 3, name: str = "x"):  # never called by the check
        raise AssertionError("check_environment must not build the environment")

    load_environment.__module__ = module.__name__
    module.load_environment = load_environment
    module.validate_args = lambda **args: seen.update(args)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    entry = EntryPoint("fake-env", f"{module.__name__}:load_environment", "rlbus.environments")
    monkeypatch.setattr("rlbus.environments.registry.available_environments", lambda: {"fake-env": entry})
    check_environment("fake-env", {"size": 5})
    assert seen == {"size": 5, "name": "x"}


def test_reverse_text_validates_before_making_examples() -> None:
    with pytest.raises(ValueError, match="num_examples=0"):
        reverse_text.make_examples(0, seed=0, min_words=1, max_words=2)
    reverse_text.validate_args(num_examples=1, min_words=1, max_words=1, seed=9)
