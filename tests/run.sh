#!/usr/bin/env bash
# The one test command (README: Tests), and what .ci/run runs: the system packages the tests need,
# a new virtual environment with requirements-dev.txt, the style checks, then the tests.
#   bash tests/run.sh [PYTEST ARGS...]      VENV=DIR picks the environment's folder (default .venv)
# The environment is made anew each run (--clear): a package left in it cannot hide a missing
# requirement. On Debian or Ubuntu the missing system packages are installed (as root, or with sudo);
# elsewhere one line says what is missing and how to get it, before any test runs.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
start=$SECONDS
say() { echo "tests/run.sh: $*"; }

# Each tool the tests use, and Debian's package for it. The tests that use one fail without it, never skip.
declare -A debian=(
  [g++]=g++                                    # builds our kernels (pip brings cmake)
  [chromium]=chromium                          # tests/test_webui.py drives it (CHROMIUM=PATH: another build)
  [aarch64-linux-gnu-g++]=g++-aarch64-linux-gnu # tests/test_kernels.py: the arm64 NEON path, cross-built...
  [qemu-aarch64]=qemu-user                     # ... and run under qemu
)
has() { if [ "$1" = chromium ] && [ -n "${CHROMIUM:-}" ]; then [ -x "$CHROMIUM" ]; else command -v "$1" >/dev/null; fi; }
missing=()
for tool in "${!debian[@]}"; do has "$tool" || missing+=("$tool"); done
python3 -c "import ensurepip" 2>/dev/null || { missing+=(python3-venv); debian[python3-venv]=python3-venv; } # Debian's python3 lacks venv

if ((${#missing[@]})); then
  packages=$(for tool in "${missing[@]}"; do echo "${debian[$tool]}"; done | sort -u | tr '\n' ' ')
  if ! command -v apt-get >/dev/null; then
    say "error: ${missing[*]} missing, and this is not Debian or Ubuntu: install them (on Debian: apt-get install $packages; set CHROMIUM=PATH for another Chromium or Chrome), then run again"
    exit 1
  fi
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || {
      say "error: ${missing[*]} missing: run this as root or with sudo, or first: sudo apt-get install -y --no-install-recommends $packages"
      exit 1
    }
    sudo=(sudo -n)
  fi
  say "installing Debian's $packages"
  # shellcheck disable=SC2086
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends $packages >/dev/null 2>&1 ||
    { "${sudo[@]}" apt-get update -qq >/dev/null 2>&1 &&
      "${sudo[@]}" apt-get install -y -qq --no-install-recommends $packages >/dev/null; } || {
    say "error: apt-get could not install $packages: install them by hand, then run again"
    exit 1
  }
fi

python3 -m venv --clear "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate" # python3 and pip are the environment's from here on
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r requirements-dev.txt
say "$venv made and requirements-dev.txt installed in $((SECONDS - start)) s"
python3 -m ruff format --check .
python3 -m ruff check .
python3 -m pytest -q "$@"
