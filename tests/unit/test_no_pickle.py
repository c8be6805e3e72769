"""Nothing in rlbus pickles: not on the bus, not between ranks, not on disk.

Unpickling runs code chosen by whoever wrote the bytes, so one hostile peer or
file would own the process. This test parses every source file of the
project (``common/``, ``services/``, ``scripts/``) and fails on any way in to
pickle we know of: the modules themselves, pyzmq's ``*_pyobj``, torch's
``*_object_list`` collectives, ``torch.load`` without ``weights_only=True``,
``np.load(allow_pickle=True)``, pandas' pickle readers, multiprocessing queues
inside services, and vLLM's switch for pickled messages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("common", "services", "scripts")
# multiprocessing moves data through pickle; scripts may use it to start helper
# processes, services talk only over the bus.
NO_MULTIPROCESSING = ("common", "services")

PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
PICKLING_CALLS = {
    "send_pyobj", "recv_pyobj", "send_serialized", "recv_serialized",  # pyzmq
    "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",  # torch.distributed
    "send_object_list", "recv_object_list",
    "read_pickle", "to_pickle",  # pandas
}
MULTIPROCESSING_CHANNELS = {"Queue", "SimpleQueue", "JoinableQueue", "Pipe", "Manager", "Pool"}
# torch.save writes a pickle stream; the one place that still does is read back with
# weights_only=True (torch's restricted unpickler that only builds tensors and containers).
TORCH_SAVE_ALLOWED = {"services/trainer/checkpoint.py"}


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def _allows_pickle(call: ast.Call) -> bool:
    # np.load refuses pickles unless allow_pickle is set to something other than False.
    return any(k.arg == "allow_pickle" for k in call.keywords) and not _keyword_is(call, "allow_pickle", False)


def _called_name(call: ast.Call) -> str:
    """``a.b.c(...)`` -> ``a.b.c`` and ``a.b().c(...)`` -> ``a.b.c``: the part readable statically."""
    parts, node = [], call.func
    while isinstance(node, ast.Attribute | ast.Call):
        if isinstance(node, ast.Call):  # a.b().c(): keep reading through the inner call
            node = node.func
            continue
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def pickle_uses(source: str, path: str) -> list[str]:
    """Every way ``source`` (the file at project-relative ``path``) may pickle, as ``path:line: what``."""
    found: list[str] = []
    multiprocessing_banned = path.startswith(NO_MULTIPROCESSING)
    for node in ast.walk(ast.parse(source)):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                top = module.split(".")[0]
                if top in PICKLING_MODULES:
                    found.append(f"{where}: imports {module}")
                if multiprocessing_banned and top == "multiprocessing":
                    found.append(f"{where}: imports {module} (its queues and pipes pickle)")
        elif isinstance(node, ast.Call):
            name = _called_name(node)
            last = name.rsplit(".", 1)[-1]
            if last in PICKLING_CALLS:
                found.append(f"{where}: calls {name}")
            elif name.endswith("torch.load") and not _keyword_is(node, "weights_only", True):
                found.append(f"{where}: torch.load without weights_only=True")
            elif name.endswith(("np.load", "numpy.load")) and _allows_pickle(node):
                found.append(f"{where}: np.load with allow_pickle")
            elif name.endswith("torch.save") and path not in TORCH_SAVE_ALLOWED:
                found.append(f"{where}: torch.save writes a pickle stream (use safetensors)")
            elif multiprocessing_banned and last in MULTIPROCESSING_CHANNELS and "multiprocessing" in name:
                found.append(f"{where}: multiprocessing {last} carries pickled data")
        elif isinstance(node, ast.Constant) and node.value == "VLLM_ALLOW_INSECURE_SERIALIZATION":
            found.append(f"{where}: mentions VLLM_ALLOW_INSECURE_SERIALIZATION (pickled engine messages)")
    return found


def project_files() -> list[Path]:
    return sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py"))


def test_no_source_file_pickles():
    assert len(project_files()) > 50, "the scan found too few files: is ROOT right?"
    found = [use for path in project_files() for use in pickle_uses(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == [], "pickle is not allowed in rlbus:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("import pickle", "imports pickle"),
        ("from cloudpickle import dumps", "imports cloudpickle"),
        ("import dill.settings", "imports dill.settings"),
        ("sock.recv_pyobj()", "calls sock.recv_pyobj"),
        ("dist.broadcast_object_list(x, src=0)", "calls dist.broadcast_object_list"),
        ("torch.load(path)", "torch.load without weights_only=True"),
        ("torch.load(path, weights_only=False)", "torch.load without weights_only=True"),
        ("np.load(path, allow_pickle=True)", "np.load with allow_pickle"),
        ("torch.save(state, path)", "torch.save writes a pickle stream"),
        ("import multiprocessing", "imports multiprocessing"),
        ("q = multiprocessing.get_context('spawn').Queue()", "multiprocessing Queue"),
        ("os.environ['VLLM_ALLOW_INSECURE_SERIALIZATION'] = '1'", "VLLM_ALLOW_INSECURE_SERIALIZATION"),
    ],
)
def test_the_scan_finds_each_way_in(source, what):
    found = pickle_uses(source, "services/example.py")
    assert len(found) >= 1 and what in found[0], found


@pytest.mark.parametrize(
    "source",
    ["torch.load(path, weights_only=True)", "np.load(path)", "np.load(path, allow_pickle=False)",
     "msgspec.msgpack.decode(data)", "json.loads(text)"],
)
def test_the_scan_allows_safe_loaders(source):
    assert pickle_uses(source, "services/example.py") == []


def test_scripts_may_start_processes_with_multiprocessing():
    assert pickle_uses("import multiprocessing", "scripts/bench/example.py") == []
