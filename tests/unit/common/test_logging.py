"""One loguru setup: console + <output_dir>/logs/<service>.log, stdlib routed in."""

import json
import logging

from loguru import logger

from rlbus.logging import setup_logging


def test_service_log_file_gets_loguru_and_stdlib_records(tmp_path):
    path = setup_logging("trainer", tmp_path, level="info", console=False)
    assert path == tmp_path / "logs" / "trainer.log"
    logger.info("step 3 done")
    logging.getLogger("vllm.engine").warning("engine says hi")
    logger.debug("hidden at info level")
    text = path.read_text()
    assert "trainer" in text and "step 3 done" in text
    assert "WARNING" in text and "engine says hi" in text
    assert "hidden at info level" not in text


def test_json_lines_are_parseable(tmp_path):
    path = setup_logging("monitor", tmp_path, level="debug", json_lines=True, console=False)
    logger.debug("as json")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[-1]["record"]["message"] == "as json"
    assert records[-1]["record"]["extra"]["service"] == "monitor"


def test_setup_twice_replaces_handlers(tmp_path):
    setup_logging("a", tmp_path, console=False)
    setup_logging("b", tmp_path, console=False)
    logger.info("only b")
    assert "only b" not in (tmp_path / "logs" / "a.log").read_text()
    assert "only b" in (tmp_path / "logs" / "b.log").read_text()


def test_http_request_lines_show_only_at_debug(tmp_path):
    path = setup_logging("env-worker", tmp_path, level="info", console=False)
    logging.getLogger("httpx").info('HTTP Request: POST http://127.0.0.1:8000/v1/completions "HTTP/1.1 200 OK"')
    logging.getLogger("httpx").warning("connection reset")
    assert "HTTP Request" not in path.read_text() and "connection reset" in path.read_text()
    path = setup_logging("env-worker", tmp_path / "debug", level="debug", console=False)
    logging.getLogger("httpx").info("HTTP Request: POST /v1/completions")
    assert "HTTP Request" in path.read_text()
