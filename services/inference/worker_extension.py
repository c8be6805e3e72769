"""Methods vLLM mixes into its worker class (``--worker-extension-cls``): they run in the worker.

The API server process cannot hand tensors to the worker (``collective_rpc``
arguments are small control values), so it passes only the announcement, the
trainer's weight endpoint and the bus settings; the worker pulls the step
itself over its own DEALER socket with :func:`rlbus.weights.fetch_weights`. Every
tensor's checksum and shape is checked, and every name and shape is compared with
the checkpoint, before anything is loaded: a failed or corrupt transfer leaves
the old weights untouched. With tensor parallelism every rank pulls the full
step and ``load_weights`` keeps its shard. Each worker keeps its receive buffers
(:class:`rlbus.weights.Staging`: one copy of the weights in host memory, two when
the trainer sends deltas, whose base is the step loaded last) from step to step.

Fan-out (``inference.weights_relay`` / ``weights_upstream``, :mod:`rlbus.weights_relay`): the worker
tries its upstream peers' relays before the trainer, checking every tensor against the trainer's
manifest all the same, and the rank-0 worker of a replica with ``weights_relay`` serves each bucket
to peers from these buffers as soon as it is verified (and stops before the next fetch rewrites them).
The report says how many bytes came from relays, from the trainer and by broadcast (``relay_bytes``,
``trainer_bytes``, ``broadcast_bytes``). Relay and collective receiver start with the replica
(:meth:`RlbusWorkerExtension.rlbus_start_transports`), before its first step.

Loading goes through the worker's ``reload_weights(weights_iterator=...)``: vLLM's
in-place reload, which calls the model's ``load_weights`` and then re-runs each
layer's post-load processing. Plain ``model.load_weights`` is not enough: on CPU
vLLM repacks linear weights for its GEMM kernels and frees the originals (and
quantized GPU models transform theirs likewise). The reload processes a layer
once all of its tensors arrived, so a step must carry every checkpoint tensor
(partial updates would leave half-filled layers) — checked before loading.

The methods return plain dicts (fields of :class:`rlbus.services.inference.policy.LoadReport`)
rather than raising, so the server can tell "refused, old weights serve" from
"loading failed half-way".
"""

from __future__ import annotations

import json
import struct
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import zmq
from loguru import logger

from rlbus.bus import Bus, BusError
from rlbus.config.base import BusConfig
from rlbus.messages import TensorMeta, WeightsAnnounced
from rlbus.services.inference.idle_spin import apply_in_worker
from rlbus.weights import FetchedStep, ReplicaTransfer, fetch_step
from rlbus.weights_relay import WeightRelay, WeightSources, fetch_from_sources

if TYPE_CHECKING:
    import torch

    from rlbus.services.inference.weight_collective import Broadcast

WORKER_EXTENSION = "rlbus.services.inference.worker_extension.RlbusWorkerExtension"
TIED_HEAD, TIED_EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


class RlbusWorkerExtension:
    """Mixed into vLLM's worker; ``self`` is the worker (``self.model_runner``, ``self.vllm_config``)."""

    model_runner: Any
    vllm_config: Any
    _rlbus_checkpoint: dict[str, list[int]] | None
    _rlbus_transfer: ReplicaTransfer
    _rlbus_relay: WeightRelay | None

    def rlbus_start_transports(self, bus_config: dict, relay: dict | None = None) -> dict:
        """Start what must run before the first step arrives: the relay peers pull from and the
        collective receiver (which joins the trainer's weight group), so neither a peer's first step
        nor the first broadcast falls back to the trainer. Cheap: both run on threads of their own."""
        relay = relay or {}
        server = self._rlbus_weight_relay(relay, bus_config)
        from rlbus.services.inference.weight_collective import process_receiver  # torch: imported late

        receiver = process_receiver()
        return {"relay": server.address if server is not None else "",
                "weight_group": receiver.settings.address if receiver is not None else ""}  # fmt: skip

    def rlbus_load_step(self, announced: dict, weights_address: str, replica_id: str, bus_config: dict,
                        relay: dict | None = None) -> dict:  # fmt: skip
        """Pull step ``announced`` (from the ``relay["upstream"]`` peers first, then the trainer), verify it,
        load it, and serve it to peers when ``relay["bind"]`` is set; returns a LoadReport dict."""
        meta = msgspec.convert(announced, WeightsAnnounced)
        report: dict[str, Any] = {"ok": False, "step": meta.step, "num_bytes": meta.total_bytes}
        started = time.perf_counter()
        transfer = self._rlbus_replica_transfer()
        relay = relay or {}
        server = self._rlbus_weight_relay(relay, bus_config)
        sources = WeightSources(weights_address, tuple(relay.get("upstream", ())),
                                relay.get("answer_timeout_s", 2.0), relay.get("wait_s", 30.0))  # fmt: skip
        try:
            mismatch = manifest_mismatch(meta.manifest, self._rlbus_checkpoint_shapes())
            if mismatch:
                raise BusError(f"step {meta.step} does not fit this model: {mismatch}")
            from rlbus.services.inference.weight_collective import receive_broadcast  # torch: imported late

            if (broadcast := receive_broadcast(meta)) is not None:  # weight_transport = "collective"
                return self._rlbus_load_broadcast(meta, broadcast, report, started)
            # With a relay, peers get each bucket once verified here (the old step no more from now on).
            fetched_step = pull_weights(meta, sources, replica_id, BusConfig(**bus_config), transfer, server)
            tensors = [(name, to_torch(array, dtype)) for name, array, dtype in fetched_step.tensors]
        except (BusError, ValueError) as exc:
            logger.warning("refused weights of step {}: {}", meta.step, exc)
            # The retry fetches in full: a delta that failed may have had a base the trainer no longer
            # means by that step number (a restarted trainer republishing it).
            transfer.forget()
            return report | {"error": str(exc), "kind": "transfer", "fetch_s": time.perf_counter() - started}
        fetched = time.perf_counter()
        report |= {"relay_bytes": fetched_step.relay_bytes, "trainer_bytes": fetched_step.trainer_bytes}
        logger.info("fetched step {} from {}: {:.1f} MB on the wire for {:.1f} MB of weights, {} tensor(s) as "
                    "deltas", meta.step, fetched_step.source, fetched_step.wire_bytes / 1e6,
                    meta.total_bytes / 1e6, fetched_step.num_delta_tensors)  # fmt: skip
        failure = self._rlbus_reload(meta, tensors)
        if failure is not None:
            transfer.forget()  # the base weights come back: no step is held any more
            return report | failure
        transfer.loaded(fetched_step)
        return report | {"ok": True, "fetch_s": fetched - started, "load_s": time.perf_counter() - fetched}

    def _rlbus_load_broadcast(self, meta: WeightsAnnounced, broadcast: Broadcast, report: dict,
                              started: float) -> dict:  # fmt: skip
        """Load ``meta`` from its broadcast, verified already (``weight_collective``); no bus fetch."""
        fetched = time.perf_counter()
        logger.info("received step {} by broadcast ({:.1f} MB)", meta.step, meta.total_bytes / 1e6)
        self._rlbus_replica_transfer().forget()  # no step held for deltas: the next bus fetch goes in full
        try:
            failure = self._rlbus_reload(meta, broadcast.tensors)
        finally:
            broadcast.release()
        if failure is not None:
            return report | failure
        return report | {"ok": True, "fetch_s": fetched - started, "load_s": time.perf_counter() - fetched,
                         "broadcast_bytes": meta.total_bytes}  # fmt: skip

    def _rlbus_reload(self, meta: WeightsAnnounced, tensors: list[tuple[str, torch.Tensor]]) -> dict | None:
        """Load verified ``tensors`` in place; None when loaded, else the failure for the report."""
        try:
            self.reload_weights(weights_iterator=tensors)  # type: ignore[attr-defined]
            refresh_tied_head(self.model_runner.get_model())
        except Exception as exc:  # noqa: BLE001 - reported to the server, which restores the base weights
            logger.exception("loading step {} failed after verification", meta.step)
            return {"error": f"{type(exc).__name__}: {exc}", "kind": "load"}
        return None

    def rlbus_reload_base(self) -> dict:
        """Reload the weights from the model directory (step 0); returns a LoadReport dict."""
        started = time.perf_counter()
        self._rlbus_replica_transfer().forget()
        try:
            self.reload_weights()  # type: ignore[attr-defined]
            refresh_tied_head(self.model_runner.get_model())
        except Exception as exc:  # noqa: BLE001 - reported; the server treats it as fatal
            logger.exception("reloading the base weights failed")
            return {"ok": False, "step": 0, "error": f"{type(exc).__name__}: {exc}", "kind": "load"}
        return {"ok": True, "step": 0, "load_s": time.perf_counter() - started}

    def _rlbus_replica_transfer(self) -> ReplicaTransfer:
        if not hasattr(self, "_rlbus_transfer"):
            self._rlbus_transfer = ReplicaTransfer()
        return self._rlbus_transfer

    def _rlbus_weight_relay(self, relay: dict, bus_config: dict) -> WeightRelay | None:
        """The relay serving this worker's verified steps to peers (``relay``: the server's
        ``InferenceConfig.relay_settings()``), started on first use; None when its ``bind`` is "",
        on tensor-parallel ranks but the first (one copy serves), or when it could not bind (logged:
        peers then fall back to the trainer, and this replica still loads its steps)."""
        if not hasattr(self, "_rlbus_relay"):
            self._rlbus_relay = None
            bind = relay.get("bind", "")
            if bind and getattr(self, "rank", 0) == 0:
                try:
                    self._rlbus_relay = WeightRelay(
                        Bus(BusConfig(**bus_config)), bind, relay.get("wait_s", 30.0)
                    ).start()
                    logger.info("serving loaded weights to peer replicas at {}", self._rlbus_relay.address)
                except BusError as exc:
                    logger.error("weights_relay off: {}", exc)
        return self._rlbus_relay

    def _rlbus_checkpoint_shapes(self) -> dict[str, list[int]] | None:
        if not hasattr(self, "_rlbus_checkpoint"):
            self._rlbus_checkpoint = checkpoint_shapes(Path(self.vllm_config.model_config.model))
        return self._rlbus_checkpoint


def refresh_tied_head(model: Any) -> None:
    """Re-run the post-load processing of an ``lm_head`` tied to the embedding.

    vLLM 0.32 on CPU packs the head's weight for its GEMM kernel after loading. An
    in-place reload never loads a tied head (the checkpoint has no such tensor), so
    it is not processed again and keeps computing logits with the *old* embedding
    while everything else moved on. Harmless elsewhere (a no-op off CPU).
    """
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


def pull_weights(announced: WeightsAnnounced, sources: WeightSources | str, replica_id: str, bus_config: BusConfig,
                 transfer: ReplicaTransfer, relay: WeightRelay | None = None) -> FetchedStep:  # fmt: skip
    """Step ``announced``, verified against its manifest, into ``transfer``'s buffers, from the first
    of ``sources`` (upstream relays, then the trainer; an address: the trainer alone) that delivers
    it, each over a DEALER used for this step only (so a late reply to an abandoned fetch can never
    be mistaken for this step's); ``relay`` serves each bucket to peers once verified."""
    sources = WeightSources(sources) if isinstance(sources, str) else sources
    return fetch_from_sources(bus_config, announced, replica_id, sources, base=transfer.base(announced),
                              staging=transfer.staging(), relay=relay)  # fmt: skip


def pull_step(announced: WeightsAnnounced, address: str, replica_id: str,
              bus_config: BusConfig) -> list[tuple[str, np.ndarray, str]]:  # fmt: skip
    """All tensors of ``announced`` (of its adapter, ``lora.name``, when it has one), checked, over
    a DEALER used for this step only (so a late reply to an abandoned fetch can never be mistaken
    for this step's)."""
    with Bus(bus_config) as bus:
        sock = bus.connect(zmq.DEALER, address, "weights")
        return fetch_step(bus, sock, announced, replica_id, bus_config.request_timeout_s, retries=2)


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor viewing ``array`` (no copy); ``bfloat16`` arrives as uint16 bits."""
    import torch

    expected = "uint16" if dtype == "bfloat16" else dtype
    if array.dtype.name != expected:
        raise ValueError(f"tensor announced as {dtype} arrived as {array.dtype.name}")
    with warnings.catch_warnings():
        # Frames are read-only; load_weights only reads the tensor, copying it into the parameter.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def checkpoint_shapes(model_dir: Path) -> dict[str, list[int]] | None:
    """Tensor name -> shape from the safetensors headers in ``model_dir``; None if there are none
    (a hub name, another format), in which case names are not checked before loading."""
    files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if not files:
        logger.warning("no safetensors in {}; weight names are not checked before loading", model_dir)
        return None
    shapes: dict[str, list[int]] = {}
    for file in files:
        with file.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
        shapes |= {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}
    return shapes


def manifest_mismatch(manifest: list[TensorMeta], shapes: dict[str, list[int]] | None) -> str:
    """Why ``manifest`` cannot load into a model with checkpoint ``shapes`` ("" if it can)."""
    if shapes is None:
        return ""
    # Tied models save only the embedding; a trainer sending state_dict() also sends the head.
    tied = TIED_HEAD not in shapes and TIED_EMBEDDING in shapes
    if tied:
        shapes = shapes | {TIED_HEAD: shapes[TIED_EMBEDDING]}
    unknown = [meta.name for meta in manifest if meta.name not in shapes]
    if unknown:
        return f"{len(unknown)} tensor(s) not in the checkpoint, e.g. {unknown[0]}"
    missing = set(shapes) - {meta.name for meta in manifest} - ({TIED_HEAD} if tied else set())
    if missing:
        return f"partial updates are not supported: {len(missing)} checkpoint tensor(s) missing, e.g. {min(missing)}"
    for meta in manifest:
        if meta.shape != shapes[meta.name]:
            return f"tensor {meta.name} has shape {meta.shape}, the checkpoint has {shapes[meta.name]}"
    return ""


# Runs in the vLLM worker when vLLM imports this class, before the worker opens its message queues.
apply_in_worker()
