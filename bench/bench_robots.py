"""robots.txt enforcement cost: scrapy-polite's middleware against Scrapy's own.

Both crawl the same 8 hosts of the local site (robots.txt with a few rules on
each; 60 pages per host, 5 of them disallowed), with no delays, in alternating
rounds, each crawl in its own process. Prints the pages per second of each and
their ratio, per round and in total, and how many disallowed pages each fetched
(Scrapy 2.19's middleware lets some through: requests that wait on a robots.txt
fetch already under way are allowed once the first of them has its answer).

    python -m bench.bench_robots [--rounds 3] [--pages 60]
"""

from __future__ import annotations

import argparse
import json

from scrapy_polite.testing.crawl import crawl
from scrapy_polite.testing.site import Reply, Site

DISALLOWED = [f"/p/{i}" for i in range(1, 6)]
ROBOTS = "User-agent: *\n" + "".join(f"Disallow: {path}$\n" for path in DISALLOWED)
COMMON = {"CONCURRENT_REQUESTS": 16, "ROBOTSTXT_OBEY": True, "LOG_LEVEL": "WARNING"}
VARIANTS = {
    "scrapy": COMMON,
    "polite": {
        **COMMON,
        "ADDONS": {"scrapy_polite.Addon": 100},
        "POLITE_DELAY_ENABLED": False,  # robots.txt only: no delay middleware
    },
}


def run(site: Site, name: str, pages: int) -> tuple[float, int]:
    site.reset()
    for host in site.hosts:
        site.route(host, "/robots.txt", Reply(200, ROBOTS))
    urls = [site.url(h, f"/p/{i}") for h in site.hosts for i in range(pages)]
    result = crawl("tests.spiders.PagesSpider", VARIANTS[name], args={"urls": json.dumps(urls)})
    hits = site.page_hits()
    disallowed = sum(h.path in DISALLOWED for h in hits)
    if len(hits) - disallowed != len(site.hosts) * (pages - len(DISALLOWED)):
        raise SystemExit(f"{name}: {len(hits)} pages fetched, some allowed ones are missing")
    return len(hits) / float(result.stat("elapsed_time_seconds")), disallowed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pages", type=int, default=60)
    args = parser.parse_args()
    totals = {name: 0.0 for name in VARIANTS}
    leaks = {name: 0 for name in VARIANTS}
    with Site() as site:
        for round_ in range(1, args.rounds + 1):
            order = list(VARIANTS) if round_ % 2 else list(reversed(VARIANTS))
            runs = {name: run(site, name, args.pages) for name in order}
            rates = {name: rate for name, (rate, _) in runs.items()}
            for name, (rate, disallowed) in runs.items():
                totals[name] += rate
                leaks[name] += disallowed
            print(
                f"round {round_}: scrapy {rates['scrapy']:.0f} pages/s, "
                f"polite {rates['polite']:.0f} pages/s, "
                f"polite/scrapy = {rates['polite'] / rates['scrapy']:.2f}"
            )
    print(
        f"mean over {args.rounds} rounds: polite/scrapy throughput = "
        f"{totals['polite'] / totals['scrapy']:.2f}"
    )
    print(
        f"disallowed pages fetched in all rounds: scrapy {leaks['scrapy']}, "
        f"polite {leaks['polite']}"
    )


if __name__ == "__main__":
    main()
