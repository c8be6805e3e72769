"""The weight fan-out tree ``rlbus rl`` builds from ``inference.weights_fanout``."""

from __future__ import annotations

from pathlib import Path

from rlbus.services.inference.config import InferenceConfig
from rlbus.services.launcher.processes import process_table
from rlbus.services.run_config import RlConfig
from rlbus.services.run_config.placement import FAKE_GPU_COUNT_VARIABLE, placement_problems

FOUR_GPUS = {FAKE_GPU_COUNT_VARIABLE: "4"}


def replica_args(config: RlConfig) -> dict[str, tuple[str, ...]]:
    return {spec.name: spec.args for spec in process_table(config, Path("out/configs"), FOUR_GPUS)
            if spec.service == "inference"}  # fmt: skip


def relay_flags(args: tuple[str, ...]) -> dict[str, str]:
    flags = {args[i]: args[i + 1] for i in range(0, len(args), 2)}
    return {key: value for key, value in flags.items() if key.startswith("--weights")}


def test_four_replicas_with_fanout_two_form_a_tree_rooted_at_the_trainer():
    config = RlConfig(inference_gpu_ids=[0, 1, 2, 3], inference=InferenceConfig(weights_fanout=2,
                                                                                 weights_relay_port=6100))  # fmt: skip
    assert placement_problems(config, FOUR_GPUS) == []
    flags = {name: relay_flags(args) for name, args in replica_args(config).items()}
    assert flags == {
        "inference-0": {"--weights-relay": "tcp://127.0.0.1:6100"},
        "inference-1": {"--weights-relay": "tcp://127.0.0.1:6101", "--weights-upstream": '["tcp://127.0.0.1:6100"]'},
        "inference-2": {"--weights-upstream": '["tcp://127.0.0.1:6100"]'},
        "inference-3": {"--weights-upstream": '["tcp://127.0.0.1:6101"]'},
    }
    # The flags parse as the replica's own config would.
    upstream = InferenceConfig(weights_upstream=["tcp://127.0.0.1:6101"]).weights_upstream
    assert upstream == ["tcp://127.0.0.1:6101"]


def test_no_fanout_and_a_single_replica_keep_the_trainer_as_the_only_source():
    assert all(not relay_flags(args) for args in replica_args(RlConfig(inference_gpu_ids=[0, 1])).values())
    single = RlConfig(inference=InferenceConfig(weights_fanout=2))
    assert replica_args(single) == {"inference": ()}


def test_relay_ports_that_collide_with_http_ports_are_a_problem():
    config = RlConfig(inference_gpu_ids=[0, 1], inference=InferenceConfig(port=7000, weights_fanout=1,
                                                                          weights_relay_port=7001))  # fmt: skip
    problems = placement_problems(config, FOUR_GPUS)
    assert [problem.key for problem in problems] == ["inference.weights_relay_port"]
