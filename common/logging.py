"""One loguru setup for every service.

Each service logs to the console (stderr) and to
``<output_dir>/logs/<service>.log``. Records from the standard ``logging``
module (vLLM, httpx, transformers, ...) are routed into loguru so everything
ends up in the same file, in the same format.

httpx logs every HTTP request at INFO: an env-worker's calls to inference would
make most of its log. Those lines show only at ``log.level = "debug"``
(``--log.level debug``); vLLM's own access log is ``inference.access_log``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from loguru import logger

CONSOLE_FORMAT = (
    "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> <cyan>{extra[service]}</cyan> | {message}"
)
FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {extra[service]} {name}:{line} | {message}"
REQUEST_LOGGERS = ("httpx", "httpcore")
"""Libraries that log one line per HTTP request: shown only at debug level."""


class InterceptHandler(logging.Handler):
    """Forwards stdlib logging records to loguru, keeping level and origin."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = logging.currentframe(), 2
        while frame is not None and frame.f_code.co_filename == logging.__file__:
            frame, depth = frame.f_back, depth + 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


FILE_ONLY = "file_only"
"""``logger.bind(file_only=True)``: a record for the log file only, e.g. the traceback of a mistake
whose one-line reason the command already prints (:class:`rlbus.errors.UserError`)."""


def _for_console(record: dict) -> bool:
    return not record["extra"].get(FILE_ONLY)


def setup_logging(
    service: str,
    output_dir: Path | None,
    level: str = "info",
    json_lines: bool = False,
    console: bool = True,
) -> Path | None:
    """Configure loguru for ``service``; returns the log file path (if any).

    Safe to call again (e.g. in tests): previous handlers are replaced.
    """
    logger.remove()
    logger.configure(extra={"service": service})
    level = level.upper()
    if console:
        logger.add(sys.stderr, level=level, format=CONSOLE_FORMAT, colorize=None, enqueue=False,
                   filter=_for_console)
    log_file = None
    if output_dir is not None:
        log_file = Path(output_dir) / "logs" / f"{service}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logger.add(log_file, level=level, format=FILE_FORMAT, serialize=json_lines, enqueue=False)
    verbose = level in ("DEBUG", "TRACE")
    logging.basicConfig(handlers=[InterceptHandler()], level=logging.DEBUG if verbose else logging.INFO, force=True)
    for name in REQUEST_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    return log_file
