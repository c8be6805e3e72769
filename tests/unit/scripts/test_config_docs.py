"""docs/config.md is generated from the config classes and must stay in step with them."""

import importlib.util
from pathlib import Path

from rlbus.config.docs import undocumented_fields
from rlbus.services.eval import EvalRunConfig
from rlbus.services.models.smollm2 import SmolLM2Config
from rlbus.services.models.tiny import TinyModelConfig
from rlbus.services.monitor.config import TailConfig
from rlbus.services.run_config import RlConfig

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "config.md"
spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
gen_config_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_config_docs)
render_config_docs = gen_config_docs.render_config_docs


def test_every_config_field_is_documented():
    for cls in (RlConfig, TinyModelConfig, SmolLM2Config, TailConfig, EvalRunConfig):
        assert undocumented_fields(cls) == [], cls.__name__


def test_config_docs_are_up_to_date():
    assert DOC.read_text() == render_config_docs(), "docs/config.md is stale: run python scripts/gen_config_docs.py"


def test_docs_mention_every_section_key():
    text = DOC.read_text()
    for key in ("`batch_size`", "`max_async_level`", "`bus.endpoints.trainer_weights`", "`loss.type`", "`wandb.mode`"):
        assert key in text, key
