"""Settings of the scrapy-polite demo project."""

BOT_NAME = "polite_demo"
SPIDER_MODULES = ["polite_demo.spiders"]
NEWSPIDER_MODULE = "polite_demo.spiders"

USER_AGENT = "PoliteDemoBot/1.0 (+https://example.invalid/demo)"

# The one line that turns scrapy-polite on.
ADDONS = {"scrapy_polite.Addon": 100}

# Every domain: a random gap of 0.2 to 0.5 s; the "slow" demo host: 1 to 2 s.
POLITE_DELAY = [0.2, 0.5]
POLITE_DELAY_DOMAINS = {"127.0.0.5": [1.0, 2.0]}
CONCURRENT_REQUESTS_PER_DOMAIN = 2

# robots.txt by RFC 9309 (the add-on puts its own middleware in place of Scrapy's).
# An unreachable robots.txt (the demo's 127.0.0.4 answers 500 at first) is tried
# again after 1 s, then 2 s, ...; its pages wait, for at most a minute.
ROBOTSTXT_OBEY = True
POLITE_ROBOTS_RETRY_DELAY = 1
POLITE_ROBOTS_UNREACHABLE_TIMEOUT = 60

TELNETCONSOLE_ENABLED = False
LOG_LEVEL = "INFO"

# Text statistics of every page, computed in worker processes, off the reactor.
POLITE_PROCESS_FUNCTION = "polite_demo.textstats.text_stats"
