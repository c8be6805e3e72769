"""Drive a verifiers v1 env server (``verifiers.v1.serve``) from an env-worker.

``[[orchestrator.train.env]] id = "verifiers:<taskset-id>"`` with ``server_address``
runs each rollout as one ``run`` request to a running env server, over the
server's own protocol (a ZeroMQ ROUTER speaking msgpack, verifiers' ``EnvClient``
on this side): the harness, its runtime, tools and judges live in the server's
process or container; only the taskset is loaded here, because the protocol
sends each task's data from the client (``args`` may set ``taskset.*`` knobs and
``num_examples``, nothing else).

Each request names, as its model client, this worker's :class:`ModelEndpoint`:
the server's interception relays every model call of the episode there, and it
is sampled token-in/token-out on rlbus inference by the code the in-process path
uses. The episode that comes back (rewards, metrics, errors) and the recorded
token branches make the rollout (:func:`~.verifiers_v1.episode_rollout`).

The connection: a health request with a timeout before the first run and after
the server was lost (:class:`EnvironmentUnavailable` naming the address when it
goes unanswered); replies matched to runs by request id (``EnvClient``); a run
that outlives the task's time is cancelled on the server; a server that
disconnects, or leaves health requests sent while runs are in flight
unanswered, is lost: its runs in flight are errored with that reason, and the
next task checks its health again, so the worker carries on once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq
from loguru import logger
from zmq.utils.monitor import parse_monitor_message

from rlbus.curve import is_loopback
from rlbus.environments import SERVER_ADDRESS_ARG, Environment, EnvironmentUnavailable, Rubric
from rlbus.messages import Rollout, RolloutTask
from rlbus.services.env_worker.model_endpoint import SECRET_HEADER, ModelEndpoint
from rlbus.services.env_worker.rollout import Sampler, Transcript, failed_rollout
from rlbus.services.env_worker.tokens import TurnRenderer
from rlbus.services.env_worker.verifiers_client import TokenSampler
from rlbus.services.env_worker.verifiers_v1 import (
    episode_rollout,
    example_of,
    first_tasks,
    keep_transcripts,
    rollout_keys,
)

HEALTH_TIMEOUT_S = 10.0
# While runs are in flight the server is asked for health this often, and lost when it stays silent
# this long (answers come from its event loop, which a long synchronous step can hold up).
LIVENESS_INTERVAL_S = 10.0
LIVENESS_TIMEOUT_S = 30.0
CLOSE_LINGER_MS = 1_000


class ServerLost(RuntimeError):
    """The env server was lost (it disconnected, or left health requests unanswered) while a run was in flight."""


def load_served_environment(env_id: str, args: dict[str, Any]) -> ServedVerifiersEnvironment:
    """The taskset's tasks, and the server's answer to a health request (``args`` nested already)."""
    import verifiers.v1 as vf

    args = dict(args)
    address, num_examples = args.pop(SERVER_ADDRESS_ARG), args.pop("num_examples", None)
    others = sorted(set(args) - {"taskset"})
    if others:
        raise ValueError(
            f"environment 'verifiers:{env_id}' runs on the env server at {address}: its args set only "
            f"`taskset.*` and `num_examples` (the server's own config sets the rest), not {others}"
        )
    config = vf.taskset_config_type(env_id).model_validate({**(args.get("taskset") or {}), "id": env_id})
    tasks = first_tasks(vf.load_taskset(config), num_examples)
    check_server(address, HEALTH_TIMEOUT_S)
    return ServedVerifiersEnvironment(address, tasks)


def check_server(address: str, timeout_s: float) -> None:
    """Ask the server at ``address`` for its health, from a loop of its own (loaders are synchronous)."""

    async def probe() -> None:
        link = ServerLink(address)
        try:
            await link.check_health(timeout_s)
        finally:
            await link.close()

    with ThreadPoolExecutor(1, thread_name_prefix="env-server-health") as pool:
        pool.submit(asyncio.run, probe()).result()


class ServerLink:
    """One DEALER to an env server (verifiers' ``EnvClient``): health handshakes, runs, and a watch on
    the connection: a disconnect, or while runs are in flight a health request left unanswered."""

    def __init__(self, address: str) -> None:
        from verifiers.v1.serve import EnvClient

        self.address = address
        self.client = EnvClient(address)
        self.events = self.client.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.healthy = False
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        """Resolves, with why, when the server is lost; a fresh one then waits for the next loss."""
        self.num_running = 0
        self._checking = asyncio.Lock()
        self._watch = asyncio.create_task(self._watch_connection(), name=f"env server {address}")
        self._liveness: asyncio.Task[None] | None = None

    async def check_health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        """Return once the server answered a health request since it was last lost."""
        async with self._checking:
            if self.healthy:
                return
            try:
                answered = await self.client.health(timeout=timeout_s)
            except RuntimeError as exc:  # the server answered success=False
                raise EnvironmentUnavailable(f"env server at {self.address} answered health with: {exc}") from None
            if not answered:
                raise EnvironmentUnavailable(
                    f"env server at {self.address} did not answer a health request within {timeout_s:g}s: is it "
                    "running (verifiers.v1.serve), and is this its server_address?"
                )
            self.healthy = True

    async def run(self, timeout_s: float, **request: Any) -> Any:
        """One episode (a ``WireEpisode``); ServerLost or TimeoutError cancel it on the server."""
        lost = self.lost
        running = asyncio.ensure_future(self.client.run(**request))
        self.num_running += 1
        if self._liveness is None or self._liveness.done():
            self._liveness = asyncio.create_task(self._check_liveness())
        try:
            await asyncio.wait({running, lost}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.num_running -= 1
            if not running.done():
                running.cancel()  # EnvClient then sends the server a cancel for this request id
                with contextlib.suppress(asyncio.CancelledError):
                    await running
        if not running.cancelled():
            return running.result()
        if lost.done():
            raise ServerLost(f"the env server at {self.address} {lost.result()} while the episode ran")
        raise TimeoutError

    def _lose(self, why: str) -> None:
        logger.warning("lost the env server at {}: it {}", self.address, why)
        self.healthy = False
        lost, self.lost = self.lost, asyncio.get_running_loop().create_future()
        lost.set_result(why)

    async def _watch_connection(self) -> None:
        """A server process that dies closes its connection: its runs are lost at once."""
        while True:
            event = parse_monitor_message(await self.events.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._lose("disconnected")
            else:
                logger.info("connected to the env server at {}", self.address)

    async def _check_liveness(self) -> None:
        """While runs are in flight, ask for health now and then: a server host that vanished, or a
        stopped process, closes no connection."""
        while self.num_running:
            try:
                answered = await self.client.health(timeout=LIVENESS_TIMEOUT_S)
            except RuntimeError:  # an answer, if a refusal: the server is there
                answered = True
            if not answered:
                self._lose(f"answered no health request within {LIVENESS_TIMEOUT_S:g}s")
                return
            await asyncio.sleep(LIVENESS_INTERVAL_S)  # the probe's period, not a synchronisation

    async def close(self) -> None:
        for task in (self._watch, self._liveness):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.client.socket.disable_monitor()
        self.events.close(linger=0)
        # Give queued cancels of abandoned runs a moment to leave (EnvClient closes with linger 0).
        self.client.socket.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        await self.client.close()


class ServedVerifiersEnvironment(Environment):
    """A verifiers v1 environment whose episodes run on an env server; the model calls come back here."""

    runs_own_loop = True
    calls_back = True
    """:class:`~.rollout.RolloutRunner` passes ``endpoint_host`` to :meth:`run_group`."""
    keeps_transcripts = True
    """... and its ``transcripts``, when it keeps them."""

    def __init__(self, address: str, tasks: list[Any]) -> None:
        super().__init__([example_of(task.data) for task in tasks], Rubric([]))
        self.address, self.tasks = address, tasks
        self.endpoint: ModelEndpoint | None = None
        self.link: ServerLink | None = None
        self._starting = asyncio.Lock()

    async def run_group(self, task: RolloutTask, sampler: Sampler, renderer: TurnRenderer, timeout_s: float,
                        endpoint_host: str | None = None,
                        transcripts: dict[str, Transcript] | None = None) -> list[Rollout]:  # fmt: skip
        endpoint, link = await self._start(sampler, renderer, endpoint_host)
        await link.check_health()
        keys = rollout_keys(task)
        data = self.tasks[task.example_id].data.model_dump(mode="json")
        deadline = time.monotonic() + timeout_s
        for index, key in enumerate(keys):
            endpoint.begin(key, task, index)
        try:
            outcomes = await asyncio.gather(*(self._episode(link, endpoint, key, task, data, deadline) for key in keys))
        finally:
            records = [endpoint.finish(key) for key in keys]
        rollouts = [
            failed_rollout(task, i, outcome) if isinstance(outcome, str) else episode_rollout(task, i, outcome, record)
            for i, (outcome, record) in enumerate(zip(outcomes, records))
        ]
        keep_transcripts(transcripts, rollouts, records)
        return rollouts

    async def _episode(self, link: ServerLink, endpoint: ModelEndpoint, key: str, task: RolloutTask,
                       data: dict[str, Any], deadline: float) -> Any:  # fmt: skip
        """The rollout's episode, or why the server gave none."""
        import verifiers.v1 as vf

        assert endpoint.url is not None
        client = vf.EvalClientConfig(base_url=endpoint.url, api_key_var="RLBUS_UNUSED_API_KEY",
                                     headers={SECRET_HEADER: endpoint.secret})  # fmt: skip
        sampling = vf.SamplingConfig(temperature=task.sampling.temperature, max_tokens=task.sampling.max_tokens)
        timeout_s = max(0.0, deadline - time.monotonic())
        try:
            return await link.run(timeout_s, client=client, model=key, sampling=sampling, task_data=data)
        except TimeoutError:
            return (f"the env server's episode outlived env_timeout_s ({timeout_s:g}s left for this group); "
                    f"cancelled it on {self.address}")  # fmt: skip
        except ServerLost as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - a failed request (success=False, a bad reply) errs one rollout
            return f"env server at {self.address}: {type(exc).__name__}: {exc}"[:2000]

    async def _start(self, sampler: Sampler, renderer: TurnRenderer,
                     endpoint_host: str | None) -> tuple[ModelEndpoint, ServerLink]:  # fmt: skip
        """The model endpoint and the server connection, started by the first group."""
        async with self._starting:
            if self.endpoint is None or self.link is None:
                endpoint = ModelEndpoint(TokenSampler(sampler, renderer))
                await endpoint.start(endpoint_host or callback_host(self.address))
                self.endpoint, self.link = endpoint, ServerLink(self.address)
        return self.endpoint, self.link

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
        if self.endpoint is not None:
            await self.endpoint.stop()
        self.endpoint, self.link = None, None


def callback_host(server_address: str) -> str:
    """Where a server at ``server_address`` reaches this host: loopback for a local server, else this
    host's address on the route to it (a UDP ``connect`` picks the interface and sends nothing)."""
    if is_loopback(server_address):
        return "127.0.0.1"
    host, _, port = server_address.removeprefix("tcp://").rpartition(":")
    family, kind, proto, _, target = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.connect(target)
        return str(probe.getsockname()[0])
