"""Built batches held until the trainer acknowledges them: exactly-once delivery.

Trainer ranks pull: ``BatchRequest(step, rank)`` is answered with that rank's
``TrainBatch`` as soon as the step is built (a request for a step not built
yet waits). The batch stays here until ``BatchAck(step)``, so a trainer that
restarts before acknowledging gets the same batch again, and a request for an
acknowledged step is ``Refused``: nothing is trained twice.

Ranks train in lockstep, so a request for step N also means every step
before N is done; those are acknowledged implicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.messages import TrainBatch


@dataclass
class BatchStore:
    acked_below: int = 1
    """Every step below this is acknowledged (steps count from 1)."""
    built: dict[int, list[TrainBatch]] = field(default_factory=dict)
    """Unacknowledged steps -> one batch per rank."""
    acked: set[int] = field(default_factory=set)
    """Acknowledged steps at or above ``acked_below`` (acks out of order)."""
    waiting: dict[tuple[bytes, int], int] = field(default_factory=dict)
    """(trainer identity, rank) -> step it asked for that is not built yet."""

    def is_acked(self, step: int) -> bool:
        return step < self.acked_below or step in self.acked

    def add(self, step: int, batches: list[TrainBatch]) -> list[tuple[bytes, TrainBatch]]:
        """Hold ``step``'s batches; returns the waiting requests they answer."""
        self.built[step] = batches
        answered = [(key, s) for key, s in self.waiting.items() if s == step]
        for key, _ in answered:
            del self.waiting[key]
        return [(identity, batches[rank]) for (identity, rank), _ in answered]

    def get(self, step: int, rank: int) -> TrainBatch | None:
        batches = self.built.get(step)
        return batches[rank] if batches is not None else None

    def wait(self, identity: bytes, rank: int, step: int) -> None:
        # Keyed by (identity, rank): a resent request replaces the first, so it is answered once.
        self.waiting[(identity, rank)] = step

    def ack(self, step: int) -> bool:
        """Mark ``step`` trained and forget its batches; False if it was already acknowledged."""
        if self.is_acked(step):
            return False
        self.acked.add(step)
        self.built.pop(step, None)
        while self.acked_below in self.acked:
            self.acked.discard(self.acked_below)
            self.acked_below += 1
        return True

    def ack_below(self, step: int) -> list[int]:
        """Acknowledge every step below ``step``; returns the held steps that this released."""
        released = sorted(s for s in self.built if s < step)
        for s in released:
            self.ack(s)
        if step > self.acked_below:
            self.acked = {s for s in self.acked if s >= step}
            self.acked_below = step
            while self.acked_below in self.acked:
                self.acked.discard(self.acked_below)
                self.acked_below += 1
        return released
