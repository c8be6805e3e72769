"""Several runs, one trainer: per-run adapters, optimizers and schedules on one frozen base."""

from __future__ import annotations

import copy
import gc
import json
import re
import weakref
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from rlbus.services.trainer.logprobs import RowTensors
from rlbus.services.trainer.lora import base_fingerprint, is_lora
from rlbus.services.trainer.model import load_model
from rlbus.services.trainer.multi_run import RunSpec, RunTable, StepSettings
from tests.unit.trainer.batches import train_batch
from tests.unit.trainer.test_lora import SOLO

SETTINGS = StepSettings(ctx=SOLO, peak_flops=1e11)


def spec(run_id: str, lr: float = 1e-2, targets: tuple[str, ...] = ("q_proj", "v_proj"), **overrides) -> RunSpec:
    # max_grad_norm this small clips every step: a gradient left over from another run would
    # change the clipping factor, so isolation tests see it.
    values = {"run_id": run_id, "lora": {"rank": 4, "alpha": 8.0, "target_modules": list(targets)},
              "optimizer": {"lr": lr, "weight_decay": 0.1, "max_grad_norm": 1e-3}, "max_steps": 10}  # fmt: skip
    return RunSpec(**{**values, **overrides})


def table(model_dir, max_runs: int = 4) -> RunTable:
    return RunTable(load_model(str(model_dir), "float32", torch.device("cpu")), max_runs, SETTINGS)


def rows(step: int, seed: int) -> tuple[list[RowTensors], int]:
    batch = train_batch(step, seed=seed)
    return [RowTensors.from_message(m, torch.device("cpu")) for m in batch.micro_batches], batch.num_loss_tokens


def train(runs: RunTable, run_id: str, step: int, seed: int = 0) -> float:
    return runs.train(run_id, step, *rows(step, seed))["loss/mean"]


def same(a: Any, b: Any) -> bool:
    """Bit-equal nested state (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def snapshot(runs: RunTable, run_id: str) -> tuple[dict, dict]:
    return runs.adapter_tensors(run_id), copy.deepcopy(runs.run(run_id).optimizer.state_dict())


def test_each_run_trains_only_its_own_adapter_with_its_own_rate(tiny_model_dir):
    runs = table(tiny_model_dir)
    runs.join(spec("alpha", lr=1e-2))
    runs.join(spec("beta", lr=3e-2, targets=("q_proj", "down_proj")))
    assert runs.train("beta", 1, *rows(1, seed=1))["optim/lr"] == 3e-2
    for step in (1, 2):
        beta_before = snapshot(runs, "beta")
        alpha_before = runs.adapter_tensors("alpha")
        assert runs.train("alpha", step, *rows(step, seed=0))["optim/lr"] == 1e-2
        assert same(snapshot(runs, "beta"), beta_before)
        assert not same(runs.adapter_tensors("alpha"), alpha_before)
        # While alpha trains only its adapter requires gradients, and no gradient outlives a step.
        trainable = {id(p) for p in runs.model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in runs.run("alpha").params.values()}
        assert all(p.grad is None for p in runs.model.parameters())
    alpha_before = snapshot(runs, "alpha")
    train(runs, "beta", 2, seed=1)
    assert same(snapshot(runs, "alpha"), alpha_before)
    assert [(p.run_id, p.step) for p in runs.runs()] == [("alpha", 2), ("beta", 2)]


def test_the_base_is_never_written(tiny_model_dir):
    runs = table(tiny_model_dir)
    plain = base_fingerprint(load_model(str(tiny_model_dir), "float32", torch.device("cpu")))
    assert runs.base_sha256 == plain
    runs.join(spec("alpha"))
    runs.join(spec("beta", lr=5e-2, targets=("k_proj", "up_proj")))
    for step in (1, 2):
        train(runs, "alpha", step, seed=0)
        train(runs, "beta", step, seed=1)
    assert base_fingerprint(runs.model) == plain


def test_a_run_trains_the_same_whatever_other_runs_do(tiny_model_dir):
    # Exact equality, no tolerance: the other run's adapter is inactive (PEFT skips it), its
    # gradients are gone before this run's step, and dropout draws from this run's own state.
    alone = table(tiny_model_dir)
    alone.join(spec("alpha", lora={"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj"]}))
    expected = [train(alone, "alpha", step) for step in (1, 2, 3)]
    shared = table(tiny_model_dir)
    shared.join(spec("beta", lr=5e-2, targets=("v_proj", "up_proj"), seed=7))  # wraps the base first
    shared.join(spec("alpha", lora={"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj"]}))
    train(shared, "beta", 1, seed=1)
    losses = [train(shared, "alpha", 1)]
    train(shared, "beta", 2, seed=1)
    train(shared, "beta", 3, seed=1)
    losses.append(train(shared, "alpha", 2))
    shared.leave("beta")
    shared.join(spec("gamma", targets=("q_proj",)))
    train(shared, "gamma", 1, seed=2)
    losses.append(train(shared, "alpha", 3))
    assert losses == expected
    assert same(shared.adapter_tensors("alpha"), alone.adapter_tensors("alpha"))
    assert same(shared.run("alpha").optimizer.state_dict(), alone.run("alpha").optimizer.state_dict())


def test_a_fresh_adapter_depends_only_on_the_run_seed(tiny_model_dir):
    first = table(tiny_model_dir)
    first.join(spec("alpha"))
    torch.rand(100)  # whatever else the trainer process draws in between
    second = table(tiny_model_dir)
    second.join(spec("beta"))
    second.join(spec("alpha"))
    second.join(spec("gamma", seed=1))
    assert same(second.adapter_tensors("alpha"), first.adapter_tensors("alpha"))
    assert same(second.adapter_tensors("beta"), first.adapter_tensors("alpha"))
    assert not same(second.adapter_tensors("gamma"), first.adapter_tensors("alpha"))


def test_a_run_that_left_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):
    runs = table(tiny_model_dir)
    alpha = spec("alpha", lora={"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]})
    runs.join(alpha)
    runs.join(spec("beta"))
    train(runs, "alpha", 1)
    beta_first = train(runs, "beta", 1, seed=1)
    train(runs, "alpha", 2)
    runs.save("alpha", tmp_path / "alpha")
    saved = runs.adapter_tensors("alpha")
    straight = train(runs, "alpha", 3), runs.adapter_tensors("alpha")
    param = weakref.ref(next(iter(runs.run("alpha").params.values())))
    assert runs.leave("alpha").step == 3
    gc.collect()
    assert param() is None  # adapter and optimizer state freed
    assert not [name for name, _ in runs.model.named_parameters() if ".alpha." in name]
    train(runs, "beta", 2, seed=1)  # the other run goes on meanwhile
    runs.join(alpha)  # restart after a kill: same id, fresh adapter, then its own checkpoint
    assert runs.load("alpha", tmp_path / "alpha").step == 2
    assert same(runs.adapter_tensors("alpha"), saved)
    assert train(runs, "alpha", 3) == straight[0]
    assert same(runs.adapter_tensors("alpha"), straight[1])
    runs.leave("alpha")
    runs.leave("beta")
    runs.join(spec("beta"))  # the last run left PEFT's wrapper empty; a fresh start is the first one again
    assert train(runs, "beta", 1, seed=1) == beta_first


@pytest.mark.parametrize("run_id", ["", "a/b", "..", ".hidden", "x" * 65, "a.b", "-x", "_x", "lora", "a\\b", "ü"])
def test_a_run_id_that_cannot_name_an_adapter_and_a_folder_is_refused(run_id):
    with pytest.raises(ValidationError, match=re.escape(f"run_id {run_id!r}")):
        spec(run_id)


def test_a_rank_below_one_is_refused():
    with pytest.raises(ValidationError, match="lora.rank"):
        spec("alpha", lora={"rank": 0})


def test_a_run_that_cannot_join_is_refused_by_name(tiny_model_dir):
    runs = table(tiny_model_dir, max_runs=2)
    with pytest.raises(ValueError, match=r"run 'alpha': lora.target_modules \['q_projj'\] match no linear"):
        runs.join(spec("alpha", targets=("q_proj", "q_projj")))
    with pytest.raises(ValueError, match=r"run 'alpha' is for another base model \(weights sha256 000000000000"):
        runs.join(spec("alpha", base_sha256="0" * 64))
    with pytest.raises(ValueError, match=r"run 'alpha': scheduler.type = 'cosine' decays towards max_steps"):
        runs.join(spec("alpha", scheduler={"type": "cosine"}, max_steps=None))
    assert runs.runs() == [] and not is_lora(runs.model)  # a refused run left nothing behind
    runs.join(spec("alpha", base_sha256=runs.base_sha256))
    with pytest.raises(ValueError, match="run_id 'alpha' is already training here"):
        runs.join(spec("alpha"))
    runs.join(spec("beta", targets=("q_proj",)))
    with pytest.raises(ValueError, match=r"run 'gamma' cannot join: max_concurrent_runs = 2 .*\['alpha', 'beta'\]"):
        runs.join(spec("gamma"))


def test_targets_are_matched_against_the_base_not_the_adapters(tiny_model_dir):
    runs = table(tiny_model_dir)
    runs.join(spec("alpha"))
    # 'alpha' now names linears inside the wrapped model (q_proj.lora_A.alpha): not a target.
    with pytest.raises(ValueError, match=r"\['alpha'\] match no linear layer"):
        runs.join(spec("beta", targets=("alpha",)))
    assert [p.run_id for p in runs.runs()] == ["alpha"]


def test_steps_go_one_after_the_other_within_the_run(tiny_model_dir):
    runs = table(tiny_model_dir)
    runs.join(spec("alpha", max_steps=1))
    with pytest.raises(KeyError, match=r"run 'beta' is not training here; active runs: \['alpha'\]"):
        train(runs, "beta", 1)
    with pytest.raises(ValueError, match="run 'alpha' last trained step 0; step 2 is not the next one"):
        train(runs, "alpha", 2)
    train(runs, "alpha", 1)
    with pytest.raises(ValueError, match="run 'alpha' ends at max_steps = 1; got step 2"):
        train(runs, "alpha", 2)


def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_changes(tiny_model_dir, tmp_path):
    runs = table(tiny_model_dir)
    runs.join(spec("alpha"))
    train(runs, "alpha", 1)
    runs.save("alpha", tmp_path / "alpha")
    other_base = load_model(str(tiny_model_dir), "float32", torch.device("cpu"))
    with torch.no_grad():
        next(other_base.parameters())[0, 0] += 1.0
    elsewhere = RunTable(other_base, 2, SETTINGS)
    elsewhere.join(spec("alpha"))
    with pytest.raises(ValueError, match=r"the adapter in .*alpha is for another base model"):
        elsewhere.load("alpha", tmp_path / "alpha")
    fresh = table(tiny_model_dir)
    fresh.join(spec("alpha", targets=("q_proj",)))
    fresh.join(spec("beta"))
    before = snapshot(fresh, "alpha")
    with pytest.raises(ValueError, match=r"has rank 4, alpha 8 on \['q_proj', 'v_proj'\]; run 'alpha' asks for "
                                         r"rank 4, alpha 8 on \['q_proj'\]"):  # fmt: skip
        fresh.load("alpha", tmp_path / "alpha")
    with pytest.raises(ValueError, match="is a checkpoint of run 'alpha', not of run 'beta'"):
        fresh.load("beta", tmp_path / "alpha")
    with pytest.raises(ValueError, match="lacks adapter_model.safetensors"):
        fresh.load("alpha", tmp_path)
    assert same(snapshot(fresh, "alpha"), before) and fresh.run("alpha").step == 0


def test_the_saved_adapter_is_a_peft_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    runs = table(tiny_model_dir)
    runs.join(spec("alpha"))
    runs.join(spec("beta", targets=("down_proj",)))
    train(runs, "alpha", 1)
    train(runs, "alpha", 2)
    tensors = runs.adapter_tensors("alpha")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert same(
        tensors, {k: v.detach() for k, v in get_peft_model_state_dict(runs.model, adapter_name="alpha").items()}
    )
    runs.save("alpha", tmp_path / "alpha")
    served = PeftModel.from_pretrained(load_model(str(tiny_model_dir), "float32", torch.device("cpu")),
                                       tmp_path / "alpha").eval()  # fmt: skip
    runs.model.set_adapter("alpha")
    runs.model.eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(served(input_ids=ids).logits, runs.model(input_ids=ids).logits)


def test_a_save_that_rechecks_the_base_records_it_hashed_again_and_refuses_a_changed_base(tiny_model_dir, tmp_path):
    runs = table(tiny_model_dir)
    runs.join(spec("alpha"))
    train(runs, "alpha", 1)
    runs.save("alpha", tmp_path / "ok", recheck_base=True)
    recorded = json.loads((tmp_path / "ok" / "lora_base.json").read_text())["base_sha256"]
    assert recorded == runs.base_sha256 == base_fingerprint(runs.model)
    base_weight = next(p for n, p in runs.model.named_parameters() if ".lora_" not in n and p.ndim == 2)
    with torch.no_grad():
        base_weight[0, 0] += 1.0  # what no run may do
    runs.save("alpha", tmp_path / "unchecked")  # the periodic save trusts the hash taken at start
    with pytest.raises(RuntimeError, match="base's weights changed while training"):
        runs.save("alpha", tmp_path / "checked", recheck_base=True)
