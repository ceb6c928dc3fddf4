#!/usr/bin/env bash
# Install what is missing (scripts/setup.sh), then run the test suite with
# the venv's python. Arguments go to pytest; none means the whole suite.
#
#   bash scripts/test.sh                      # everything, e2e included
#   bash scripts/test.sh tests/unit -x -q     # a part, pytest options
#
# Which autogentoo the tests import: the checkout, everywhere. pytest runs
# from the repo root and tests/ is a package, so the repo root is first on
# sys.path; tests/conftest.py puts it on PYTHONPATH too, so the daemons and
# agctl that tests start as root (`$VENV/bin/python -m autogentoo.daemon`)
# import the same files. Processes a test runs as another user may be unable
# to read the checkout (CI clones under /root, mode 700) and then import the
# venv's installed copy, which setup.sh has just reinstalled from this
# checkout: so under this script both copies are the same code.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
venv=${AUTOGENTOO_VENV:-/opt/autogentoo/venv}

bash "$here/setup.sh"

cd "$repo"
(($# > 0)) || set -- tests/
rc=0
"$venv/bin/python" -m pytest -ra "$@" || rc=$?
if ((rc == 5)); then
    echo "test.sh: pytest collected no tests from: $*; failing" >&2
    exit 1
fi
exit "$rc"
