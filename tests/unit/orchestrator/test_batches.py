"""Batch store: held until acknowledged, implicit acks, waiting requests answered once."""

from rlbus.messages import TrainBatch
from rlbus.services.orchestrator.batches import BatchStore


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


def test_renumber_moves_held_batches_and_forgets_requests_for_the_renumbered_steps():
    store = BatchStore()
    for step in (5, 7):
        store.add(step, batches(step))
    store.wait(b"rank0", 0, 2)  # before the new numbers: still answered when step 2 is built
    store.wait(b"rank1", 1, 3)  # step 3 will be another batch: forgotten
    held5, held7 = store.built[5], store.built[7]
    assert store.renumber(3) == [(5, 3), (7, 4)]
    assert sorted(store.built) == [3, 4] and store.built[3] is held5 and store.built[4] is held7
    assert [b.step for b in held5 + held7] == [3, 3, 4, 4]
    assert store.num_held == 2 and store.holds(3) and not store.holds(5)
    assert store.waiting == {(b"rank0", 0): 2}
    assert store.add(3, batches(3)) == []


def test_renumber_with_nothing_held_only_forgets_waiting_requests():
    store = BatchStore()
    store.wait(b"rank0", 0, 4)
    assert store.renumber(2) == [] and store.waiting == {} and store.num_held == 0
