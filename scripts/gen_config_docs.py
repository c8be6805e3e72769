"""Regenerate docs/config.md from the config classes: python scripts/gen_config_docs.py

A tool of the repository, not of the product: it imports every config class
(services, the merged run config, model tools), which no service may do.
tests/unit/scripts/test_config_docs.py fails when docs/config.md is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlbus.config import ServiceConfig
from rlbus.config.docs import markdown_table
from rlbus.services.eval import EvalRunConfig
from rlbus.services.keys import KeysConfig
from rlbus.services.models.smollm2 import SmolLM2Config
from rlbus.services.models.tiny import TinyModelConfig
from rlbus.services.monitor.config import TailConfig
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.run_config import SECTIONS, RlConfig
from rlbus.services.run_config.short import markdown_short_table
from rlbus.services.synthesize.config import SynthesizeConfig
from rlbus.services.trainer.sft_config import SftConfig

HEADER = """# Configuration reference

Generated from the config classes by `python scripts/gen_config_docs.py`; a test fails when this file is stale.

Every command takes `@ file.toml` (several are deep-merged left to right), then `--key value` flags
(`--section.key-name value`, `--flag` / `--no-flag`, lists and tables as JSON). Environment variables
`RLBUS_<KEY>` and `RLBUS_<SECTION>__<KEY>` (nested keys joined by `__`) sit below files and flags.
Unknown keys, wrong types and out-of-range values stop the command with exit code 2 before anything starts.

`rlbus rl` reads the merged config: the shared fields at the top level, one table per service. A service
started alone (`rlbus trainer @ trainer.toml`) reads a flat file: the shared fields and its own section's
keys at the top level; `rlbus rl ... --dry-run` writes exactly those files to `<output_dir>/configs/`.
"""


def render_config_docs() -> str:
    parts = [HEADER]
    shared = {name: ServiceConfig.model_fields[name] for name in ServiceConfig.SHARED_FIELDS}
    parts.append(markdown_table(
        "Shared fields",
        "Set at the top level of the `rl` config; they propagate into every section, and a section that sets "
        "one to a different value is an error.",
        _only(ServiceConfig, shared),
    ))
    launcher_only = {k: v for k, v in RlConfig.model_fields.items() if k not in SECTIONS and k not in shared}
    parts.append(markdown_table("`rlbus rl` (launcher)", "Top-level keys used by the launcher only.",
                                _only(RlConfig, launcher_only)))
    parts.append(markdown_short_table())
    for name, cls in SECTIONS.items():
        own = {k: v for k, v in cls.model_fields.items() if k not in shared}
        parts.append(markdown_table(f"`[{name}]` — rlbus {cls.SERVICE}", " ".join((cls.__doc__ or "").split()),
                                    _only(cls, own)))
    eval_own = {k: v for k, v in EvalRunConfig.model_fields.items() if k not in OrchestratorConfig.model_fields}
    parts.append(markdown_table(
        "`rlbus eval`",
        "`rlbus eval` reads the orchestrator's keys (it uses the `eval` and `sampling` tables) plus `[client]`, "
        "the OpenAI-compatible endpoint it samples from, and the error threshold of its exit code.",
        _only(EvalRunConfig, eval_own),
    ))
    synthesize_own = {k: v for k, v in SynthesizeConfig.model_fields.items() if k not in ("bus", "max_steps", "log")}
    parts.append(markdown_table(
        "`rlbus synthesize`",
        " ".join((SynthesizeConfig.__doc__ or "").split()) + " Its own config, not a section of `rl`: files and "
        "flags only, no environment variables (the API key's variable is named by `client.api_key_var`); "
        "`log` as above. Guide: docs/synthesize.md.",
        _only(SynthesizeConfig, synthesize_own),
    ))
    parts.append(markdown_table("`rlbus keys`", " ".join((KeysConfig.__doc__ or "").split()), KeysConfig))
    parts.append(markdown_table("`rlbus tail`", " ".join((TailConfig.__doc__ or "").split()), TailConfig))
    sft_own = {k: v for k, v in SftConfig.model_fields.items() if k not in shared}
    sft_doc = " ".join((SftConfig.__doc__ or "").split()) + " Shared fields as above."
    parts.append(markdown_table("`rlbus sft`", sft_doc, _only(SftConfig, sft_own)))
    parts.append(markdown_table("`rlbus model tiny`", " ".join((TinyModelConfig.__doc__ or "").split()),
                                TinyModelConfig))
    parts.append(markdown_table("`rlbus model smollm2`", " ".join((SmolLM2Config.__doc__ or "").split()),
                                SmolLM2Config))
    return "\n".join(parts)


def _only(cls, fields):
    """A stand-in model class exposing just ``fields`` of ``cls`` to the table renderer."""
    return type(cls.__name__, (), {"model_fields": fields})


TARGET = Path(__file__).resolve().parents[1] / "docs" / "config.md"

if __name__ == "__main__":
    TARGET.write_text(render_config_docs())
    sys.stdout.write(f"wrote {TARGET}\n")
