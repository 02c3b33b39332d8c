"""The demo project as one worker of a cluster: run as many as you like, on any machines.

``SCRAPY_SETTINGS_MODULE=polite_demo.settings_cluster scrapy crawl demo`` in each worker
(or, under Scrapyd, the same settings per job through ``schedule.json``'s ``setting=``).
scrapy-redis shares the queue and the dupefilter; scrapy-polite, seeing scrapy-redis's
scheduler and a Redis URL, turns cluster mode on: every worker keeps each site's pace,
back-off, Crawl-delay and robots.txt together, through the same Redis.
"""

import os

from polite_demo.settings import *  # noqa: F403

SCHEDULER = "scrapy_redis.scheduler.Scheduler"
# scrapy-redis's dupefilter that survives a Redis outage.
DUPEFILTER_CLASS = "scrapy_polite.cluster.DupeFilter"
# Every worker points at the same Redis (scrapy-polite reads scrapy-redis's setting).
REDIS_URL = os.environ.get("DEMO_REDIS_URL", "redis://127.0.0.1:6379/0")
# Leases of a worker that died come back to the others after this many seconds.
POLITE_CLUSTER_LEASE = 10
