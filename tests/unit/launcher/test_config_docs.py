"""docs/config.md is generated from the config classes and must stay in step with them."""

from pathlib import Path

from common.config.docs import undocumented_fields
from services.launcher.config import RlConfig
from services.launcher.docs import render_config_docs
from services.models.smollm2 import SmolLM2Config
from services.models.tiny import TinyModelConfig
from services.monitor.config import TailConfig
from services.orchestrator.eval_run import EvalRunConfig

DOC = Path(__file__).resolve().parents[3] / "docs" / "config.md"


def test_every_config_field_is_documented():
    for cls in (RlConfig, TinyModelConfig, SmolLM2Config, TailConfig, EvalRunConfig):
        assert undocumented_fields(cls) == [], cls.__name__


def test_config_docs_are_up_to_date():
    assert DOC.read_text() == render_config_docs(), "docs/config.md is stale: run python scripts/gen_config_docs.py"


def test_docs_mention_every_section_key():
    text = DOC.read_text()
    for key in ("`batch_size`", "`max_async_level`", "`bus.endpoints.trainer_weights`", "`loss.type`", "`wandb.mode`"):
        assert key in text, key
