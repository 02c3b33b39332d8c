"""The demo site: the test suite's multi-host site, with a few demo behaviours.

Serves 127.0.0.2 to 127.0.0.5 on one port (default 8350), until interrupted.
127.0.0.5 is the "slow" host that the demo settings give a longer delay.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.site import Site

DEMO_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


def build(port: int) -> Site:
    return Site(DEMO_HOSTS, port, pages=12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8350)
    args = parser.parse_args()
    with build(args.port) as site:
        print("demo site:", ",".join(site.url(h, "") for h in site.hosts), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
