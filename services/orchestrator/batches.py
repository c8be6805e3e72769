"""Built batches held until the trainer acknowledges them: exactly-once delivery.

Trainer ranks pull: ``BatchRequest(step, rank)`` is answered with that rank's
``TrainBatch`` as soon as the step is built (a request for a step not built
yet waits). The batch stays here until ``BatchAck(step)``, so a trainer that
restarts before acknowledging gets the same batch again, and a request for an
acknowledged step is ``Refused``: nothing is trained twice.

Ranks train in lockstep, so a request for step N also means every step
before N is done; those are acknowledged implicitly.

Acknowledged batches are *retained* until the progress checkpoint of their step
is written (:meth:`BatchStore.forget_up_to`): a trainer that restarts from its
checkpoint, older than its last acknowledgement, gets them again (:meth:`replay`)
and repeats those steps with the same batches instead of skipping them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlbus.messages import TrainBatch


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
    retained: dict[int, list[TrainBatch]] = field(default_factory=dict)
    """Acknowledged steps newer than the last checkpoint -> their batches."""

    def is_acked(self, step: int) -> bool:
        return step < self.acked_below or step in self.acked

    def first_unacked(self, start: int) -> int:
        """The first step at or after ``start`` not acknowledged yet."""
        step = start
        while self.is_acked(step):
            step += 1
        return step

    def add(self, step: int, batches: list[TrainBatch]) -> list[tuple[bytes, TrainBatch]]:
        """Hold ``step``'s batches; returns the waiting requests they answer."""
        self.built[step] = batches
        answered = [(key, s) for key, s in self.waiting.items() if s == step]
        for key, _ in answered:
            del self.waiting[key]
        return [(identity, batches[rank]) for (identity, rank), _ in answered]

    @property
    def num_held(self) -> int:
        """Built steps not acknowledged yet."""
        return len(self.built)

    def holds(self, step: int) -> bool:
        """``step`` is built and not acknowledged yet."""
        return step in self.built

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
        if step in self.built:
            self.retained[step] = self.built.pop(step)
        while self.acked_below in self.acked:
            self.acked.discard(self.acked_below)
            self.acked_below += 1
        return True

    def forget_up_to(self, step: int) -> None:
        """Steps up to ``step`` are in a checkpoint: their batches are never needed again."""
        self.retained = {s: batches for s, batches in self.retained.items() if s > step}

    def replay(self, step: int) -> bool:
        """Make the acknowledged steps from ``step`` on unacknowledged again, with their retained
        batches; False (nothing changed) unless every one of them is retained."""
        steps = range(step, self.acked_below)
        if not steps or self.acked or any(s not in self.retained for s in steps):
            return False
        for s in steps:
            self.built[s] = self.retained.pop(s)
        self.acked_below = step
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

    def renumber(self, from_step: int) -> list[tuple[int, int]]:
        """Give the held steps consecutive numbers from ``from_step`` on, in their order, batches
        included; returns (old step, new step) of each. Requests waiting for a step from
        ``from_step`` on are forgotten: that number now names another batch, or none yet."""
        self.waiting = {key: s for key, s in self.waiting.items() if s < from_step}
        moves = [(old_step, new_step) for new_step, old_step in enumerate(sorted(self.built), start=from_step)]
        renumbered: dict[int, list[TrainBatch]] = {}
        for old_step, new_step in moves:
            for batch in self.built[old_step]:
                batch.step = new_step
            renumbered[new_step] = self.built[old_step]
        self.built = renumbered
        return moves
