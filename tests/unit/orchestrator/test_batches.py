"""Batch store: held until acknowledged, implicit acks, waiting requests answered once."""

from common.messages import TrainBatch
from services.orchestrator.batches import BatchStore


def batches(step: int, world_size: int = 2) -> list[TrainBatch]:
    return [TrainBatch(step=step, rank=r, world_size=world_size, micro_batches=[], num_loss_tokens=0)
            for r in range(world_size)]


def test_waiting_requests_are_answered_once_when_the_step_is_built():
    store = BatchStore()
    store.wait(b"rank0", 0, 1)
    store.wait(b"rank1", 1, 1)
    store.wait(b"rank0", 0, 1)  # resent request: still one answer
    answered = store.add(1, batches(1))
    assert sorted((identity, b.rank) for identity, b in answered) == [(b"rank0", 0), (b"rank1", 1)]
    assert store.add(2, batches(2)) == []


def test_batches_stay_until_acknowledged_then_are_refused():
    store = BatchStore()
    store.add(1, batches(1))
    assert store.get(1, 1).rank == 1 and store.get(1, 1) is store.get(1, 1)
    assert store.ack(1) and not store.ack(1)
    assert store.get(1, 0) is None and store.is_acked(1)


def test_out_of_order_and_implicit_acks():
    store = BatchStore()
    for step in range(1, 5):
        store.add(step, batches(step))
    assert store.ack(3)
    assert store.acked_below == 1 and store.is_acked(3) and not store.is_acked(2)
    assert store.ack_below(3) == [1, 2]
    assert store.acked_below == 4 and sorted(store.built) == [4]
    assert store.ack_below(8) == [4] and store.acked_below == 8 and store.is_acked(7)
