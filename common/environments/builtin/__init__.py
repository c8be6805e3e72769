"""Built-in environments, registered under ``rlbus.environments`` in pyproject.toml."""

END_OF_TEXT = ("<|im_end|>", "<|endoftext|>")
"""What may end a completion besides whitespace: a server that keeps special tokens in the text
shows the end-of-sequence token the model stopped on."""


def without_end_of_text(completion: str) -> str:
    """``completion`` less a trailing end-of-text marker (one of ``END_OF_TEXT``)."""
    for marker in END_OF_TEXT:
        completion = completion.removesuffix(marker)
    return completion
