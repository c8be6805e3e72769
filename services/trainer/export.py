"""``rlbus export-weights CHECKPOINT OUT``: the HF weights of a sharded checkpoint, written offline.

A sharded checkpoint (``ckpt.format = "sharded"``) keeps model and optimizer as DCP shards, one file
per rank that wrote it, and no HF folder of its own: the trainer writes the servable copy into
``weights/step_N``, which ``keep_last`` prunes like the rest. This command rebuilds that copy from the
shards in one process, without a process group or the ranks that wrote them: DCP reassembles each
tensor from the files that hold its pieces, and the folder is written the way the trainer writes
``weights/step_N`` (``save_pretrained`` of a model built on the meta device, so nothing is allocated
twice). It needs memory for the whole model once, not for the optimizer.

The model's ``config.json`` (and tokenizer) are not in the shards: they come from ``--model`` or,
without it, from the run folder the checkpoint is in (its ``weights/step_*``, else the ``model`` of
its ``configs/trainer.toml`` or ``configs/sft.toml``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tomllib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from rlbus.errors import UserError
from rlbus.logging import setup_logging

SHARDS = "shards"  # ckpt_sharded.SHARDS; that module imports torch, which --help must not wait for
METADATA = ".metadata"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
RUN_CONFIGS = ("trainer.toml", "sft.toml")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rlbus export-weights",
        description="Write the HF weights (safetensors, config, tokenizer) of a sharded checkpoint "
        "(trainer.ckpt.format = sharded) into a new folder that transformers and vLLM load. Runs in one "
        "process on a CPU, whatever number of ranks wrote the checkpoint.",
    )  # fmt: skip
    parser.add_argument("checkpoint", type=Path,
                        help="the checkpoint's step folder (<output_dir>/checkpoints/step_N) or its shards/ folder")  # fmt: skip
    parser.add_argument("out", type=Path, help="the HF folder to write (must not exist, or be empty)")
    parser.add_argument("--model", default=None,
                        help="model folder to take config.json and the tokenizer from (default: the run "
                             "folder's weights/step_*, else the model of its configs/trainer.toml or sft.toml)")  # fmt: skip
    args = parser.parse_args(list(argv))
    setup_logging("export-weights", None)
    try:
        out = export_weights(args.checkpoint, args.out, args.model)
    except UserError as exc:
        sys.stderr.write(f"rlbus export-weights: {exc}\n")
        return 1
    sys.stdout.write(f"{out}\n")
    return 0


def export_weights(checkpoint: Path, out: Path, model: str | None = None) -> Path:
    """Write the HF folder of the sharded ``checkpoint`` into ``out``; returns ``out``. A
    :class:`UserError` names what is wrong with the checkpoint, the model source or ``out``."""
    shards = shards_folder(checkpoint)
    source = model if model is not None else source_from_run(shards.parent)
    _check_out(out)
    from rlbus.services.trainer.ckpt_sharded import read_model_shards

    try:
        tensors = read_model_shards(shards)
    except (OSError, ValueError, RuntimeError) as exc:  # a truncated or foreign .distcp file
        raise UserError(f"cannot read the shards in {shards}: {exc}") from exc
    if not tensors:
        raise UserError(f"{shards} holds no model tensors (only optimizer state?): not a trainer checkpoint")
    partial = out.with_name(f"{out.name}.partial")  # never a half-written folder under the name asked for
    shutil.rmtree(partial, ignore_errors=True)
    count = len(tensors)  # save_pretrained empties the dict as it writes
    try:
        _write_hf_folder(tensors, source, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.is_dir():
        out.rmdir()  # empty, checked above
    os.rename(partial, out)
    logger.info("wrote {} tensors into {} from {} (config from {})", count, out, shards, source)
    return out


def shards_folder(checkpoint: Path) -> Path:
    """The DCP folder of ``checkpoint`` (a ``step_N`` folder or its ``shards/``), checked complete."""
    if not checkpoint.exists():
        raise UserError(f"no checkpoint at {checkpoint}: give a step folder such as <output_dir>/checkpoints/step_N")
    if not checkpoint.is_dir():
        raise UserError(f"{checkpoint} is a file, not a checkpoint folder (<output_dir>/checkpoints/step_N)")
    if checkpoint.name.endswith(".partial"):
        raise UserError(f"{checkpoint} is a checkpoint still being written, or left half-written by a crash")
    if (checkpoint / "model" / "config.json").is_file():
        raise UserError(f"{checkpoint} is a full checkpoint (ckpt.format = full): its model/ folder is the HF "
                        "folder already; use it as it is")  # fmt: skip
    shards = checkpoint if checkpoint.name == SHARDS else checkpoint / SHARDS
    if not shards.is_dir():
        raise UserError(f"{checkpoint} is not a sharded checkpoint: it has no {SHARDS}/ folder (written by a "
                        "trainer with ckpt.format = sharded)")  # fmt: skip
    if not (shards / METADATA).is_file():
        raise UserError(f"{shards} lacks {METADATA}: the write did not finish, or this is not a DCP checkpoint")
    from rlbus.services.trainer.ckpt_sharded import missing_shard_files

    try:
        missing = missing_shard_files(shards)
    except Exception as exc:  # DCP's metadata is torch's own format: any failure to read it means the same
        raise UserError(f"{shards / METADATA} cannot be read ({exc}): not a DCP checkpoint") from exc
    if missing:
        raise UserError(f"{shards} lacks {', '.join(missing)}: copy every rank's files into it (ranks on other "
                        "hosts may have written theirs to their own disks)")  # fmt: skip
    return shards


def source_from_run(step: Path) -> str:
    """Where the run that wrote the checkpoint in ``step`` (``<run>/checkpoints/step_N``) keeps its
    model's config: a ``weights/step_*`` folder (this step's first), else its trainer's ``model``."""
    if step.parent.name != "checkpoints":
        raise UserError(f"{step} is not in a run folder's checkpoints/, where the model's config.json would be "
                        "found: pass --model <the run's model folder>")  # fmt: skip
    run = step.parent.parent
    weights = sorted(run.glob("weights/step_*/config.json"), key=lambda p: (p.parent.name != step.name, p))
    if weights:
        return str(weights[0].parent)
    for name in RUN_CONFIGS:
        config = run / "configs" / name
        model = tomllib.loads(config.read_text()).get("model") if config.is_file() else None
        if isinstance(model, str) and (Path(model).expanduser() / "config.json").is_file():
            return model
    raise UserError(f"no config.json for the model of {step}: neither {run / 'weights'} nor the model of "
                    f"{run / 'configs'} has one; pass --model <the run's model folder>")  # fmt: skip


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: give a new folder to write the weights into")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: give a new folder to write the weights into")


def _write_hf_folder(tensors: dict[str, Any], source: str, folder: Path) -> None:
    """``tensors`` as the trainer writes ``weights/step_N``, with ``source``'s config and tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlbus.services.trainer.model import load_tokenizer, save_hf_snapshot

    config = _from_source(AutoConfig.from_pretrained, source, "config.json")
    dtype = Counter(t.dtype for t in tensors.values() if t.is_floating_point()).most_common(1)[0][0]
    with torch.device("meta"):  # only its config, names and shapes are used: the tensors are ours
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False  # as the trainer's model (load_model) writes it
    _check_matches(model, tensors, source)
    _share_tied(model, tensors)
    if _has_file(source, "generation_config.json"):
        from transformers import GenerationConfig

        model.generation_config = _from_source(GenerationConfig.from_pretrained, source, "generation_config.json")
    tokenizer = _from_source(load_tokenizer, source, "tokenizer") if _has_file(source, *TOKENIZER_FILES) else None
    if tokenizer is None:
        logger.warning("{} has no tokenizer: the exported folder has none either", source)
    save_hf_snapshot(model, tensors, tokenizer, folder)


def _from_source(load: Any, source: str, what: str) -> Any:
    from rlbus.model_path import check_model_path

    check_model_path(source)
    try:
        return load(source)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the model's {what} from {source}: {exc}") from exc


def _check_matches(model: Any, tensors: dict[str, Any], source: str) -> None:
    """The shards hold exactly the tensors the config describes, in its shapes."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems = [f"missing {n}" for n in sorted(expected.keys() - tensors.keys())]
    problems += [f"unexpected {n}" for n in sorted(tensors.keys() - expected.keys())]
    problems += [f"{n} is {tuple(tensors[n].shape)}, not {shape}" for n, shape in sorted(expected.items())
                 if n in tensors and tuple(tensors[n].shape) != shape]  # fmt: skip
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(f"the checkpoint's tensors do not fit the model of {source} ({shown}): "
                        "pass --model <the model the run trained>")  # fmt: skip


def _share_tied(model: Any, tensors: dict[str, Any]) -> None:
    """Names the model ties (``lm_head.weight`` = the embeddings) get one tensor, as in a one-rank
    trainer's state, so ``save_pretrained`` writes it once: DCP loads each name into its own tensor."""
    import torch

    names_by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
    for first, *others in names_by_param.values():
        for name in others:
            if not torch.equal(tensors[name], tensors[first]):
                raise UserError(f"the checkpoint's {name} differs from {first}, which the model ties it to")
            tensors[name] = tensors[first]


def _has_file(source: str, *names: str) -> bool:
    """Whether the local folder ``source`` holds one of ``names`` (a hub name: assume it does)."""
    folder = Path(source).expanduser()
    return any((folder / name).is_file() for name in names) if folder.is_dir() else True
