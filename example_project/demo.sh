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
.venv/bin/python example_project/demo_site.py --port "$port" >"$work/site.log" 2>&1 &
site_pid=$!
trap 'kill $site_pid 2>/dev/null || true' EXIT
sleep 1

sites="http://127.0.0.2:$port,http://127.0.0.3:$port,http://127.0.0.4:$port,http://127.0.0.5:$port"
cd example_project
echo "== demo crawl of $sites"
../.venv/bin/scrapy crawl demo -a site="$sites" -O "$work/items.jsonl" 2>&1 \
  | grep -E "scrapy-polite|scrapy_polite.robots|item_scraped_count|polite/|finish_reason|elapsed_time" || true
echo "== $(wc -l <"$work/items.jsonl") items in $work/items.jsonl"
