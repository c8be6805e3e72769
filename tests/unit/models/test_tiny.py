"""The byte-level ChatML tokenizer, the tiny Qwen3 model and ``rlbus model tiny``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlbus.config.docs import undocumented_fields
from rlbus.services.models.cli import main
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from rlbus.services.models.tokenizer import ENDOFTEXT, IM_END, IM_START, build_tokenizer

pytest.importorskip("transformers")

SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    return build_tiny_model(out, TinyModelConfig(out=out, **SMALL))


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    "text",
    ["hello world", "  leading and trailing  \n", "héllo wörld, 世界 🙂\t\r\n", "\x00\x7f control", ""],
)
def test_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8")), "token id b must be byte b"
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids_and_round_trip(tokenizer):
    text = f"{IM_START}user\nhi{IM_END}\n{ENDOFTEXT}"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.convert_tokens_to_ids(IM_START) == 257
    assert tokenizer.convert_tokens_to_ids(IM_END) in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi\n"
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == ENDOFTEXT


def test_vocabulary_is_padded_to_a_multiple_of_64(tokenizer):
    assert len(tokenizer) % 64 == 0
    # Every id the model can emit decodes to a known token.
    assert all(tokenizer.convert_ids_to_tokens(i) is not None for i in range(len(tokenizer)))


def test_chat_template_renders_chatml(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    closed = tokenizer.apply_chat_template(messages, tokenize=False)
    assert closed.endswith("2+2?<|im_end|>\n")


def test_chat_template_renders_tools_and_tool_calls(tokenizer):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "3"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nS\n\n# Tools")
    assert text.count("<|im_start|>system") == 1
    assert '"name": "add"' in text.split("\n</tools>")[0]
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in text
    assert text.endswith("<|im_start|>tool\n3<|im_end|>\n<|im_start|>assistant\n")


def test_config_fields_are_documented_and_validated():
    assert undocumented_fields(TinyModelConfig) == []
    with pytest.raises(ValueError, match="num_kv_heads"):
        TinyModelConfig(out=Path("x"), num_heads=4, num_kv_heads=3)


def test_build_is_byte_identical_for_identical_arguments(tmp_path, tiny_dir):
    again = build_tiny_model(tmp_path / "again", TinyModelConfig(out=tmp_path, **SMALL))
    hashes = file_hashes(tiny_dir)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(hashes)
    assert file_hashes(again) == hashes
    other_seed = build_tiny_model(tmp_path / "seed1", TinyModelConfig(out=tmp_path, seed=1, **SMALL))
    assert file_hashes(other_seed)["model.safetensors"] != hashes["model.safetensors"]


def test_config_json_is_what_vllm_expects(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["dtype"] == "float32"
    assert config["head_dim"] >= 64 and config["vocab_size"] % 64 == 0
    assert config["eos_token_id"] == 258
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [258, 256]


def test_model_loads_and_generates_greedily(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.dtype == torch.float32
    assert model.num_parameters() > 0 and model.config.tie_word_embeddings
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    num_prompt = prompt["input_ids"].shape[1]
    # Greedy decoding; min_new_tokens so an early <|im_end|> cannot make the test vacuous.
    output = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert output.shape == (1, num_prompt + 8)
    assert torch.equal(output[0, :num_prompt], prompt["input_ids"][0])
    again = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(output, again)
    assert isinstance(tokenizer.decode(output[0, num_prompt:]), str)


def test_cli_builds_the_model(tmp_path):
    out = tmp_path / "cli"
    args = ["tiny", "--out", str(out), "--hidden-size", "64", "--num-layers", "1", "--intermediate-size", "128"]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (64, 1, 128)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--head-dim", "32"], ["head_dim", "64"]),
        (["--hidden-sise", "64"], ["hidden_sise", "did you mean 'hidden_size'"]),
        (["--num-heads", "4", "--num-kv-heads", "3"], ["num_kv_heads"]),
        ([], ["out is required", "--out VALUE"]),
    ],
)
def test_cli_refuses_bad_arguments_with_exit_code_2(tmp_path, capsys, args, expected):
    out_args = [] if not args else ["--out", str(tmp_path / "bad")]
    assert main(["tiny", *out_args, *args]) == 2
    err = capsys.readouterr().err
    assert all(text in err for text in expected), err
    assert not (tmp_path / "bad").exists()


def test_cli_usage_and_help(capsys):
    assert main([]) == 2
    assert "usage: rlbus model" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "smollm2" in capsys.readouterr().out
    assert main(["tiny", "--help"]) == 0
    assert "--hidden-size INT" in capsys.readouterr().out
    assert main(["huge", "--out", "x"]) == 2


def test_cli_module_does_not_import_torch():
    code = "import sys, rlbus.services.models.cli; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
