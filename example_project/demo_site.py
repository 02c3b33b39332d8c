"""The demo site: the test suite's multi-host site, with a few demo behaviours.

Serves 127.0.0.2 to 127.0.0.5 on one port (default 8350), until interrupted.
127.0.0.5 is the "slow" host that the demo settings give a longer delay.
Every host answers ``/_demo/hits`` with the number of requests the site has
received (that one excepted), so demo.sh can show what a cached run costs it.

robots.txt: 127.0.0.2 disallows /p/1 (so /p/1, /p/10 and /p/11 are never
fetched); 127.0.0.3 asks for a Crawl-delay of 1 s; 127.0.0.4's robots.txt
answers 500 twice before it recovers, so its pages wait and are crawled late;
127.0.0.5 has none (404: everything allowed).
"""

from __future__ import annotations

import argparse
import time

from scrapy_polite.testing.site import Hit, Reply, Site

DEMO_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
HITS_PATH = "/_demo/hits"


def build(port: int) -> Site:
    site = Site(DEMO_HOSTS, port, pages=12)
    _add_robots(site)
    return site


def _add_robots(site: Site) -> None:
    disallowing, crawl_delay, failing, _ = DEMO_HOSTS
    site.route(
        disallowing,
        "/robots.txt",
        Reply(200, "User-agent: *\nDisallow: /p/1    # also /p/10, /p/11 ...\n"),
    )
    site.route(crawl_delay, "/robots.txt", Reply(200, "User-agent: *\nCrawl-delay: 1\n"))
    site.route(
        failing, "/robots.txt", Reply(500), Reply(500), Reply(200, "User-agent: *\nAllow: /\n")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8350)
    args = parser.parse_args()
    with build(args.port) as site:
        add_hit_counter(site)
        print("demo site:", ",".join(site.url(h, "") for h in site.hosts), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def add_hit_counter(site: Site) -> None:
    """Serve ``/_demo/hits``: how many requests the site has received."""

    def hits(hit: Hit) -> Reply:
        count = sum(1 for h in site.hits() if h.path != HITS_PATH)
        return Reply(200, f"{count}\n", [("Content-Type", "text/plain")])

    for host in site.hosts:
        site.route(host, HITS_PATH, hits)


if __name__ == "__main__":
    main()
