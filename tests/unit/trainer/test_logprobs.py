"""Packed rows give the logprobs of their samples run alone; temperatures scale logits."""

import numpy as np
import pytest
import torch

from rlbus.services.trainer.logprobs import row_from_arrays, row_logprobs, sample_ids, sample_lengths
from rlbus.services.trainer.model import load_model


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    model = load_model(str(tiny_model_dir), "float32", torch.device("cpu"))
    model.eval()  # no dropout in Qwen3, but be explicit: these tests compare numbers
    return model


def row(ids, positions, mask=None, temperatures=None):
    ids, positions = np.asarray(ids), np.asarray(positions)
    built = row_from_arrays(ids, positions, np.ones(len(ids), bool) if mask is None else np.asarray(mask),
                            torch.device("cpu"))  # fmt: skip
    if temperatures is not None:
        built.temperatures = torch.tensor(temperatures, dtype=torch.float32)
    return built


def test_sample_ids_follow_position_restarts():
    positions = torch.tensor([0, 1, 2, 0, 1, 0, 0, 1])
    assert sample_ids(positions).tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    assert sample_lengths(positions).tolist() == [3, 2, 1, 2]


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_packed_row_matches_samples_run_separately(model, padded):
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 256, size=n) for n in (9, 4, 13)]
    with torch.no_grad():
        alone = [row_logprobs(model, row(s, np.arange(len(s))))[0] for s in samples]
        positions = np.concatenate([np.arange(len(s)) for s in samples])
        packed, _ = row_logprobs(model, row(np.concatenate(samples), positions), padded=padded)
    start = 0
    for sample, expected in zip(samples, alone, strict=True):
        got = packed[start:start + len(sample)]
        # Token 0 of each sample has no prediction in either layout; the rest must agree.
        torch.testing.assert_close(got[1:], expected[1:], rtol=1e-5, atol=1e-5)
        start += len(sample)
    # Without restarting positions the second sample would see the first: the values differ.
    with torch.no_grad():
        leaked, _ = row_logprobs(model, row(np.concatenate(samples[:2]), np.arange(13)))
    assert not torch.allclose(leaked[10:13], alone[1][1:4], atol=1e-4)


def test_both_layouts_give_the_same_logprobs_entropy_and_gradients(model):
    rng = np.random.default_rng(1)
    lengths = (7, 12, 3, 12)
    ids = rng.integers(0, 256, size=sum(lengths))
    positions = np.concatenate([np.arange(n) for n in lengths])
    results = []
    for padded in (False, True):
        model.zero_grad()
        logprobs, entropy = row_logprobs(model, row(ids, positions), padded=padded)
        logprobs.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logprobs.detach(), entropy, grads))
    model.zero_grad()
    (packed_lp, packed_entropy, packed_grad), (padded_lp, padded_entropy, padded_grad) = results
    starts = np.cumsum((0, *lengths[:-1]))
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[torch.as_tensor(starts)] = False  # no prediction for a sample's first token in either layout
    torch.testing.assert_close(padded_lp[keep], packed_lp[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_entropy[keep], packed_entropy[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_grad, packed_grad, rtol=1e-4, atol=1e-5)


def test_logits_are_divided_by_each_tokens_temperature(model):
    ids = np.array([5, 17, 99, 3, 42])
    positions = np.arange(5)
    temperatures = [1.0, 1.0, 0.5, 2.0, 1.0]
    with torch.no_grad():
        got, entropy = row_logprobs(model, row(ids, positions, temperatures=temperatures))
        logits = model(input_ids=torch.tensor(ids)[None], position_ids=torch.tensor(positions)[None]).logits[0]
    for i in range(1, 5):
        expected = torch.log_softmax(logits[i - 1] / temperatures[i], -1)[ids[i]]
        assert got[i].item() == pytest.approx(expected.item(), abs=1e-5)
    assert got[0].item() == 0.0 and entropy[0].item() == 0.0
    probs = torch.softmax(logits[1] / 0.5, -1)
    assert entropy[2].item() == pytest.approx(-(probs * probs.log()).sum().item(), rel=1e-4)
