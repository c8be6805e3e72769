"""Rollout samples as the Parquet table of the Prime platform's training viewer.

The columns and their types are prime-rl's ``SAMPLE_SCHEMA`` (src/prime_rl/monitors/prime.py), the
same as prime-runs' ``train_sample_schema``: one row per rollout. rlbus samples are text, so the
chat columns hold one user and one assistant message, and ``trajectory`` one branch of both with
the token counts. ``pyarrow`` is imported only here (the ``monitor`` extra; ``trainer`` has it too).
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from typing import Any

from rlbus.messages import Sample

COLUMNS = (
    ("run_id", "string"), ("step", "int64"), ("tag", "string"), ("problem_id", "int64"), ("sample_id", "int64"),
    ("prompt", "string"), ("completion", "string"), ("trajectory", "string"), ("answer", "string"),
    ("env_name", "string"), ("task", "string"), ("info", "string"), ("reward", "float64"),
    ("advantage", "float64"), ("metrics", "string"), ("timing", "string"), ("num_input_tokens", "int64"),
    ("num_output_tokens", "int64"), ("created_at", "timestamp"),
)  # fmt: skip


def samples_parquet(samples: list[Sample], run_id: str, step: int, first_sample_id: int = 0) -> bytes:
    """One Parquet object holding ``samples`` of ``step`` (an ImportError when pyarrow is missing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(),
             "timestamp": pa.timestamp("us", tz="UTC")}  # fmt: skip
    schema = pa.schema([(name, types[kind]) for name, kind in COLUMNS])
    now = datetime.now(UTC)
    rows = [_row(sample, run_id, step, first_sample_id + index, now) for index, sample in enumerate(samples)]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer, compression="snappy")
    return buffer.getvalue()


def _row(sample: Sample, run_id: str, step: int, sample_id: int, now: datetime) -> dict[str, Any]:
    prompt = [{"role": "user", "content": sample.prompt}]
    completion = [{"role": "assistant", "content": sample.completion}]
    branch = {"messages": prompt + completion, "num_input_tokens": sample.num_prompt_tokens,
              "num_output_tokens": sample.num_completion_tokens, "advantage": sample.advantage}  # fmt: skip
    return {
        "run_id": run_id, "step": step, "tag": "", "problem_id": sample_id, "sample_id": sample_id,
        "prompt": json.dumps(prompt), "completion": json.dumps(completion), "trajectory": json.dumps([branch]),
        "answer": sample.answer or "", "env_name": sample.env_id, "task": json.dumps({"answer": sample.answer}),
        "info": json.dumps({"finish_reason": sample.finish_reason, "policy_step": sample.policy_step}),
        "reward": sample.reward, "advantage": sample.advantage, "metrics": "{}", "timing": "{}",
        "num_input_tokens": sample.num_prompt_tokens, "num_output_tokens": sample.num_completion_tokens,
        "created_at": now,
    }  # fmt: skip
