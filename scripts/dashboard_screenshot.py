"""Screenshot of the dashboard of run folders, e.g. the README's image of the quickstart's RL run:

    python scripts/dashboard_screenshot.py outputs/quickstart/rl --out docs/images/dashboard.png

Serves the folders as ``rlbus dashboard`` does (on a free loopback port, in this process), opens the
page in a headless Chromium (Debian's, through Selenium: scripts/ci/install_chromium.sh and the test
extra), waits until every chart shows the runs' last step, and saves the whole page as a PNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlbus.logging import setup_logging
from rlbus.services.monitor.dashboard import folder_problem, run_names
from rlbus.services.monitor.dashboard_server import DashboardServer, missing_static_files
from rlbus.services.monitor.dashboard_state import Dashboard
from tests.integration.browser import full_page_screenshot, headless_chromium, wait_until

TIMEOUT_S = 60.0
LAST_STEPS = """return [...document.querySelectorAll('.run-card')].map(card => Number(card.dataset.step))"""
CHARTS_DRAWN = """return document.querySelectorAll('.chart-card:not([hidden]) canvas').length"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dirs", nargs="+", type=Path, metavar="output_dir")
    parser.add_argument("--out", type=Path, default=Path("docs/images/dashboard.png"), help="PNG to write")
    parser.add_argument("--width", type=int, default=1400, help="browser window width, pixels")
    args = parser.parse_args()
    problem = folder_problem(args.output_dirs) or (
        f"the page is not built ({', '.join(map(str, missing_static_files()))} missing): "
        "run scripts/build_dashboard.sh" if missing_static_files() else None
    )  # fmt: skip
    if problem:
        sys.stderr.write(f"dashboard_screenshot: {problem}\n")
        return 2
    setup_logging("dashboard", None, "warning")
    dashboard = Dashboard.of_folders(run_names(args.output_dirs))
    dashboard.poll()
    last_steps = [run.last_row["step"] if run.last_row else 0 for run in dashboard.runs]
    server = DashboardServer(dashboard, "127.0.0.1", 0).start()
    try:
        with headless_chromium(width=args.width) as driver:
            driver.get(server.url)
            wait_until(lambda: driver.execute_script(LAST_STEPS) == last_steps, TIMEOUT_S, f"steps {last_steps}")
            wait_until(lambda: driver.execute_script(CHARTS_DRAWN), TIMEOUT_S, "the charts")
            path = full_page_screenshot(driver, args.out)
    finally:
        server.stop()
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
