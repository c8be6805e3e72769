"""``rlbus rl``'s Prime platform run: registered before any service starts, marked when the run ends.

The launcher is where a run starts in every deployment it drives (locally, under ``rlbus run``, and
with ``--slurm``, whose job scripts carry the monitor's config), and the one process that knows why
a run ended. So it checks the key and registers the run before anything starts, hands the id to the
monitor in the monitor's resolved config (``prime_platform.run_id``: no file is shared, a restarted
monitor keeps streaming into the same run), and once every service stopped (the monitor last, its
uploads drained) marks the run completed, or failed with the supervisor's reason: a service that
failed or was lost, Ctrl-C, SIGTERM (``rlbus stop``). A launcher killed with -9 cannot: its monitor,
which it gave its pid (``RLBUS_LAUNCHER_PID``), marks the run when it finds itself reparented. A
monitor started without ``rlbus rl`` registers and marks the run itself
(:mod:`rlbus.services.monitor.platform_run`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from loguru import logger

from rlbus.config import write_toml
from rlbus.platform_client import PlatformClient, mark_end, register_run
from rlbus.prime_platform import dashboard_url, resolve_api_key
from rlbus.services.launcher.supervisor import RunResult
from rlbus.services.run_config import RlConfig


@dataclass
class LauncherPlatformRun:
    client: PlatformClient
    run_id: str

    def finish(self, result: RunResult | None) -> None:
        """Mark the run by how it ended (None: the launcher itself failed); never raises for the platform."""
        try:
            if result is not None and result.exit_code == 0:
                mark_end(self.client, self.run_id, "completed")
            else:
                reason = result.reason if result is not None else "the launcher failed (see its log, logs/rl.log)"
                mark_end(self.client, self.run_id, "failed", reason)
        finally:
            self.client.close()


def check_platform_key(config: RlConfig, environ: Mapping[str, str]) -> None:
    """A PlatformError before anything starts when the platform is on and no API key can be found."""
    if config.monitor.prime_platform is not None:
        resolve_api_key(environ)


def start_platform_run(config: RlConfig, environ: Mapping[str, str]) -> LauncherPlatformRun | None:
    """Register the run (or take ``prime_platform.run_id``) and give the monitor its id; None when off.

    Only the monitor's config gets the id (``configs/monitor.toml``, and what ``--slurm`` submits):
    ``rl.toml`` keeps the settings as given, so a run started again from it registers a new run
    rather than streaming into one that was marked already."""
    settings = config.monitor.prime_platform
    if settings is None:
        return None
    client = PlatformClient(settings.base_url, resolve_api_key(environ))
    try:
        run_id = settings.run_id
        if run_id is None:
            run_id = register_run(client, config.model_dump(mode="json"), settings.run_name, settings.team_id,
                                  environ)  # fmt: skip
        else:
            logger.info("prime platform: streaming into run {} ({})", run_id, dashboard_url(run_id, environ))
        platform = settings.model_copy(update={"run_id": run_id})
        # Not assigned: that would validate the run config again, which wants one [prime_platform].
        config.__dict__["monitor"] = config.monitor.model_copy(update={"prime_platform": platform})
        write_toml(config.monitor, config.output_dir / "configs" / "monitor.toml")
    except BaseException:
        client.close()
        raise
    return LauncherPlatformRun(client, run_id)
