"""``[slurm]``: how ``rlbus rl --slurm`` submits a run as SLURM job arrays (docs/slurm.md).

One array per service; inference replicas and env-workers are the tasks of
their arrays. Options set at the top of the section apply to every array; a
service's own table (``[slurm.trainer]``) adds to or overrides them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from rlbus.config import ConfigModel


class SlurmServiceConfig(ConfigModel):
    """sbatch options of one service's array (each task gets these)."""

    cpus: int = Field(1, ge=1)
    """CPUs per task (``--cpus-per-task``)."""
    gpus: int = Field(0, ge=0)
    """GPUs per task (``--gres=gpu:N``); 0 asks for none."""
    mem: str | None = None
    """Memory per task (``--mem``, e.g. ``"32G"``); None takes the partition's default."""
    time: str | None = None
    """Time limit (``--time``, e.g. ``"2:00:00"``); None takes ``slurm.time``."""
    partition: str | None = None
    """Partition; None takes ``slurm.partition``."""
    extra_args: list[str] = []
    """More sbatch arguments for this array only, after ``slurm.extra_args``, e.g. ``["--constraint=a100"]``."""


class SlurmConfig(ConfigModel):
    """Running the services as SLURM job arrays instead of local processes (``rlbus rl --slurm``)."""

    enabled: bool = False
    """Submit to SLURM instead of starting local processes (``--slurm`` for short)."""
    partition: str | None = None
    """Partition of every array; None takes the cluster's default."""
    time: str | None = None
    """Time limit of every array (``--time``); None takes the partition's default."""
    extra_args: list[str] = []
    """sbatch arguments added to every array, e.g. ``["--account=myproj", "--qos=high"]``."""
    num_inference_replicas: int = Field(1, ge=1)
    """Inference replicas, the tasks of the inference array; replica ``i`` listens on
    ``inference.port + i`` so replicas sharing a node never collide. The local launcher starts one."""
    trainer_nodes: int = Field(1, ge=1)
    """Tasks (nodes) of the trainer array, each starting ``trainer.num_ranks`` ranks; they meet at
    task 0's node on ``MASTER_PORT`` (29500 unless set in ``slurm.setup``) (docs/scaling.md)."""
    job_name: str | None = None
    """Prefix of the job names (``<prefix>-<service>``); None uses ``rlbus-<output_dir name>``."""
    workdir: Path | None = None
    """Folder the jobs run in on the compute nodes, holding the rlbus checkout; relative paths in the
    config (model, output_dir) are relative to it. None uses the folder ``rlbus rl`` is started in."""
    python: str | None = None
    """Python interpreter on the compute nodes; None uses the one running ``rlbus rl``."""
    setup: list[str] = []
    """Shell lines each job runs before its service, e.g. ``["module load cuda/12.4",
    "source .venv/bin/activate"]``."""
    output: str = "/tmp/%x-%A_%a.out"
    """Console output file of each task on its node (``--output``; ``%x`` job name, ``%A`` array
    job id, ``%a`` task); a node-local folder that exists everywhere, as there is no shared filesystem."""
    stream_logs: bool = True
    """Follow each task's console output on its node (``srun --overlap tail -F``) and print it here,
    also writing it to ``<output_dir>/logs/<task>.out`` on this host."""
    poll_interval_s: float = Field(2.0, gt=0)
    """Seconds between job state queries (``scontrol show job``) while following the run."""
    rendezvous_timeout_s: float = Field(900.0, gt=0)
    """How long a starting task waits for the tasks it connects to to be running before it fails."""
    cancel_timeout_s: float = Field(120.0, gt=0)
    """After ``scancel``, how long to wait for every task to end before giving up with an error."""
    monitor: SlurmServiceConfig = SlurmServiceConfig()
    """sbatch options of the monitor."""
    orchestrator: SlurmServiceConfig = SlurmServiceConfig()
    """sbatch options of the orchestrator."""
    trainer: SlurmServiceConfig = SlurmServiceConfig()
    """sbatch options of the trainer."""
    inference: SlurmServiceConfig = SlurmServiceConfig()
    """sbatch options of each inference replica."""
    env_worker: SlurmServiceConfig = SlurmServiceConfig()
    """sbatch options of each env-worker."""

    def for_service(self, section: str) -> SlurmServiceConfig:
        """The options of ``section`` (``env_worker``, ...)."""
        return getattr(self, section)

    def sbatch_args(self, section: str) -> list[str]:
        """The sbatch options of one service's array, shared options first."""
        own = self.for_service(section)
        args = [f"--cpus-per-task={own.cpus}"]
        if own.gpus:
            args.append(f"--gres=gpu:{own.gpus}")
        if own.mem:
            args.append(f"--mem={own.mem}")
        partition, time = own.partition or self.partition, own.time or self.time
        if partition:
            args.append(f"--partition={partition}")
        if time:
            args.append(f"--time={time}")
        return [*args, *self.extra_args, *own.extra_args]
