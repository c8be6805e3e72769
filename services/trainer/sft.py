"""``rlbus sft``: supervised fine-tuning with the RL trainer's step, packing and checkpoints.

Each step takes ``batch_size`` examples in a seeded per-epoch order, packs them
into rows of at most ``seq_len`` tokens, spreads the rows over the ranks (equal
counts) and runs one :class:`TrainStep` with the negative log-likelihood of the
completion tokens, normalised by the step's loss-token count. The data position
follows from the step number alone, so a resumed run continues with the same
examples a straight run would have seen.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from loguru import logger

from rlbus.bench import SFT_BENCH, print_bench_table
from rlbus.bus import Bus
from rlbus.environments.builtin import first_letter, larger_number
from rlbus.errors import UserError
from rlbus.pubsub import TelemetryClient
from rlbus.services.trainer.data import reverse_text
from rlbus.services.trainer.data.loading import Row, read_rows
from rlbus.services.trainer.distributed import DistContext, shutdown_distributed
from rlbus.services.trainer.logprobs import RowTensors, row_from_arrays
from rlbus.services.trainer.model import load_tokenizer
from rlbus.services.trainer.runtime import Runtime, build_runtime
from rlbus.services.trainer.sft_config import SftConfig
from rlbus.services.trainer.sft_data import Sample, SampleBuilder, pack, split_for_ranks
from rlbus.services.trainer.sft_records import SftRecords


def load_examples(config: SftConfig) -> tuple[list[Row], list[Row]]:
    """Training and validation rows, per ``data``."""
    data = config.data
    if data.synthetic is not None:
        num_val = round(data.num_examples * data.val_fraction / (1 - data.val_fraction))
        if data.synthetic == "reverse-text":
            rows = reverse_text.generate(data.num_examples + num_val, config.seed, data.min_words, data.max_words)
        elif data.synthetic == "first-letter":
            rows = first_letter.generate_sft(data.num_examples + num_val, config.seed)
        else:
            rows = larger_number.generate_sft(data.num_examples + num_val, config.seed)
        return rows[: data.num_examples], rows[data.num_examples :]
    assert data.path is not None
    rows = read_rows(data.path, data.split)
    if data.val_path is not None:
        return rows, read_rows(data.val_path, data.split)
    num_val = int(len(rows) * data.val_fraction)
    order = np.random.default_rng([config.seed, 7]).permutation(len(rows))
    return [rows[i] for i in order[num_val:]], [rows[i] for i in order[:num_val]]


@dataclass
class SftPlan:
    """Which examples each step trains on."""

    num_examples: int
    batch_size: int
    seed: int
    shuffle: bool

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def indices(self, step: int) -> np.ndarray:
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_examples) if self.shuffle
                 else np.arange(self.num_examples))  # fmt: skip
        return order[index * self.batch_size : (index + 1) * self.batch_size]


class SftLoop:
    def __init__(self, config: SftConfig, runtime: Runtime, train: list[Sample], val: list[Sample],
                 total_steps: int, telemetry: TelemetryClient) -> None:  # fmt: skip
        self.config, self.rt = config, runtime
        self.train, self.val, self.total_steps = train, val, total_steps
        self.telemetry = telemetry
        self.plan = SftPlan(len(train), config.batch_size, config.seed, config.data.shuffle)
        self.pad_id = runtime.tokenizer.pad_token_id or 0
        self.started = time.monotonic()
        # No monitor runs beside SFT: the main rank writes the run's metrics files itself.
        self.records = SftRecords(config.output_dir, f"sft-rank{runtime.ctx.rank}") if runtime.ctx.is_main else None
        self.bench_rows: list[dict[str, Any]] = []
        """The steps rows of this run, for the ``--bench`` table (main rank)."""

    def rows(self, samples: list[Sample]) -> list[RowTensors]:
        """This rank's share of ``samples``, packed."""
        ctx: DistContext = self.rt.ctx
        share = split_for_ranks(pack(samples, self.config.seq_len), ctx.world_size, self.pad_id)[ctx.rank]
        return [row_from_arrays(r.input_ids, r.position_ids, r.loss_mask, ctx.device) for r in share]

    def run(self) -> None:
        for step in range(self.rt.start_step + 1, self.total_steps + 1):
            started = time.perf_counter()
            samples = [self.train[i] for i in self.plan.indices(step)]
            metrics = self.rt.trainer.run(step, self.rows(samples), sum(s.num_loss_tokens for s in samples))
            if (
                self.val
                and self.config.val_interval
                and (step % self.config.val_interval == 0 or step == self.total_steps)
            ):
                metrics["val/loss"] = self.validate()
            metrics["time/save_ckpt"] = self.checkpoint(step)
            metrics["time/step"] = time.perf_counter() - started
            metrics["progress/epoch"] = (step - 1) // self.plan.steps_per_epoch
            if self.records is not None:
                self.telemetry.metrics(step, metrics)
                row = self.records.write(step, metrics)
                if self.config.bench:
                    self.bench_rows.append(row)
                if step % self.config.log_interval == 0 or step == self.total_steps:
                    self.log_progress(step, metrics)
        self.save_final()
        if self.records is not None:
            self.records.close()
            if self.config.bench:
                print_bench_table(self.bench_rows, SFT_BENCH)

    def validate(self) -> float:
        return self.rt.trainer.evaluate(self.rows(self.val), sum(s.num_loss_tokens for s in self.val))

    def checkpoint(self, step: int) -> float:
        if not self.rt.ckpt.due(step):
            return 0.0
        started = time.perf_counter()
        self.rt.save(step, {"epoch": (step - 1) // self.plan.steps_per_epoch})
        return time.perf_counter() - started

    def save_final(self) -> None:
        step = self.total_steps
        already = self.rt.ckpt.due(step) or step <= self.rt.start_step
        if self.config.save_final and not already:
            self.rt.save(step, weights_only=True)
        self.rt.ckpt.wait()  # save_async: the run is done when its checkpoints are on disk
        if self.rt.ctx.is_main:
            logger.info(
                "SFT done: weights of step {} in {}; per-step figures in {}",
                step,
                "none written (bench mode)" if self.config.bench else self.rt.ckpt.weights / f"step_{step}",
                self.records.steps.path if self.records else "-",
            )

    def log_progress(self, step: int, metrics: dict[str, float]) -> None:
        done = step / self.total_steps
        bar = "#" * round(20 * done) + "." * (20 - round(20 * done))
        elapsed = time.monotonic() - self.started
        steps_run = step - self.rt.start_step
        eta = elapsed / steps_run * (self.total_steps - step)
        val = f" | val {metrics['val/loss']:.4f}" if "val/loss" in metrics else ""
        logger.info("sft [{}] {}/{} {:.0%} | loss {:.4f}{} | lr {:.2e} | {:.0f} tok/s | mfu {:.1%} | eta {:.0f}s",
                    bar, step, self.total_steps, done, metrics["loss/mean"], val, metrics["optim/lr"],
                    metrics["perf/throughput"], metrics["perf/mfu"], eta)  # fmt: skip


def run_sft(config: SftConfig) -> int:
    """Entry of ``rlbus sft``."""
    train_rows, val_rows = load_examples(config)  # first: a data mistake needs no tokenizer to be found
    tokenizer = load_tokenizer(config.model)
    builder = SampleBuilder(tokenizer, config.data, config.seq_len)
    train, val = [builder.build(r) for r in train_rows], [builder.build(r) for r in val_rows]
    if not train:
        raise UserError(
            f"no SFT examples in {config.data.path or config.data.synthetic}: give data.path a file "
            "with at least one example"
        )
    if config.val_interval and not val:
        logger.warning("val_interval = {} but there are no validation examples (set data.val_fraction or "
                       "data.val_path): no validation", config.val_interval)  # fmt: skip
    if builder.num_truncated:
        logger.warning("{} example(s) longer than seq_len = {} were truncated", builder.num_truncated, config.seq_len)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = config.max_steps or config.num_epochs * steps_per_epoch
    logger.info("SFT on {} examples ({} for validation), {} steps of {} examples{}", len(train), len(val),
                total_steps, config.batch_size, " (bench mode: checkpoints, final weights and validation off)"
                if config.bench else "")  # fmt: skip
    runtime = build_runtime(config, None, total_steps)
    try:
        with Bus(config.bus) as bus:
            telemetry = TelemetryClient(bus, "sft", f"sft-rank{runtime.ctx.rank}")
            SftLoop(config, runtime, train, val, total_steps, telemetry).run()
    finally:
        shutdown_distributed()
    return 0
