"""A byte-level ChatML tokenizer built in code, for the tiny test model.

Token id ``b`` (0-255) is the byte ``b``, so any UTF-8 text round-trips and
nothing has to be downloaded or trained. There are no merges: sequences are
one token per byte, which is fine for a model that exists to exercise the
pipeline rather than to be good. Special tokens follow Qwen's ChatML
(``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``), so chat prompts look like
those of the real policies; reserved tokens fill the vocabulary up to a
multiple of 64 so that every id the model can emit decodes to something.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
NUM_BYTES = 256
VOCAB_MULTIPLE = 64

# Qwen-style ChatML. With ``tools`` the tool signatures go into the system turn
# as JSON lines and assistant tool calls are rendered as <tool_call> blocks,
# the format Qwen models (and vLLM's "hermes" tool parser) expect.
CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call functions. Their signatures are within <tools></tools>:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each call, return a JSON object with name and arguments within \
<tool_call></tool_call> tags.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if not (tools and loop.first and message['role'] == 'system') %}
{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}
{%- for call in message.get('tool_calls') or [] %}
{%- set call = call.function if call.function is defined else call %}
{%- set arguments = call.arguments if call.arguments is string else call.arguments | tojson %}
{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}
{{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' + arguments + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (the ByteLevel alphabet).

    Written out (rather than taken from ``ByteLevel.alphabet()``, which is an
    unordered set) so that token id ``b`` is exactly byte ``b``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(NUM_BYTES):
        if byte not in printable:
            printable.append(byte)
            chars.append(NUM_BYTES + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def vocab_size(multiple: int = VOCAB_MULTIPLE) -> int:
    """Size of the tokenizer's vocabulary: bytes + specials, rounded up to ``multiple``."""
    used = NUM_BYTES + len(SPECIAL_TOKENS)
    return -(-used // multiple) * multiple


def reserved_tokens(multiple: int = VOCAB_MULTIPLE) -> list[str]:
    first = NUM_BYTES + len(SPECIAL_TOKENS)
    return [f"<|reserved_{i}|>" for i in range(vocab_size(multiple) - first)]


def build_core_tokenizer(multiple: int = VOCAB_MULTIPLE):
    """The ``tokenizers.Tokenizer``: a BPE model with no merges over the byte alphabet."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = bytes_to_unicode()
    vocab = {alphabet[byte]: byte for byte in range(NUM_BYTES)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: without merges it would only cost time, and keeping
    # spaces attached changes nothing when every token is a single byte.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    names = [*SPECIAL_TOKENS, *reserved_tokens(multiple)]
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
    assert tokenizer.get_vocab_size() == vocab_size(multiple), "special token ids must follow the bytes"
    return tokenizer


def build_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """The byte-level ChatML tokenizer as a transformers fast tokenizer (eos = ``<|im_end|>``)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_core_tokenizer(),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
