#!/usr/bin/env bash
# Run the project's test suites. No test run (pytest exit 5) is a failure, not a pass.
#   scripts/run-tests.sh [PYTEST_ARGS...]            every suite but the real-cluster tier (make test)
#   scripts/run-tests.sh --cluster [PYTEST_ARGS...]  the real-cluster tier, tests/cluster (make test-cluster)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
mkdir -p results
if [ "${1:-}" = "--cluster" ]; then
  shift
  set -- tests/cluster -o timeout=10800 --durations=30 --junitxml=results/cluster-junit.xml "$@"
else
  set -- tests --ignore=tests/cluster --durations=15 --junitxml=results/tests-junit.xml "$@"
fi
.venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
