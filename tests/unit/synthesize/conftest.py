"""Fixtures of the ``rlbus synthesize`` tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from loguru import logger


@dataclass
class LoguruRecords:
    """Warnings and errors logged through loguru while a test ran."""

    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def caplog_loguru() -> Iterator[LoguruRecords]:
    records = LoguruRecords()
    handler = logger.add(lambda message: records.lines.append(str(message)), level="WARNING")
    try:
        yield records
    finally:
        logger.remove(handler)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The tiny model's tokenizer (its chat template renders tool calls as Hermes blocks)."""
    from rlbus.services.models.tokenizer import build_tokenizer

    return build_tokenizer()
