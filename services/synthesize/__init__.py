"""``rlbus synthesize``: roll out environments against a model endpoint and write an SFT dataset.

A command beside the CLI, like ``rlbus eval``, not part of any service: it runs the
env-worker's rollout code in one process, against any vLLM server (``rlbus inference``
or ``vllm serve``), and writes every rollout as a row of a JSONL file that ``rlbus sft``
reads as it is (``messages``, ``tools``, plus reward, metrics and where it came from).
:mod:`.config` holds its config, :mod:`.endpoint` the start-up check of the endpoint,
:mod:`.dataset` the rows and the resumable files, :mod:`.run` the loop. docs/synthesize.md
is the user's guide.
"""
