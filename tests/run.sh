#!/usr/bin/env bash
# Runs every HeadSeg test on a fresh machine: sets up the venv, torch and a pinned real ComfyUI
# (tests/setup_env.sh), installs Debian's Chromium for the browser tests when it is missing,
# then runs pytest over tests/ (pure core, in-process ComfyUI, live server, browser).
# Extra arguments go to pytest, e.g.  bash tests/run.sh tests/core -x
set -euo pipefail
# An exported CDPATH has cd print the folder it found, into the $(cd ... && pwd) below.
unset CDPATH
# Sourced before changing folder: a relative HEADSEG_HOME or HEADSEG_COMFYUI names a folder from the caller's.
source "$(dirname "$0")/setup_env.sh"
cd "$HEADSEG_REPO"
# Held shared until pytest ends: a setup for a checkout that needs other packages does not delete the
# venv under it (tests/setup_env.sh).
if command -v flock >/dev/null; then exec 8>>"$HEADSEG_HOME/.venv-users.lock"; flock -s 8; fi

# A Chromium is needed only when the run collects the browser tests: with no path (pytest's testpaths,
# tests/) or a path at, above or inside tests/browser. `bash tests/run.sh tests/core` needs none (it
# stopped where Chromium could not be installed, and ran apt-get through sudo where it could).
# Paths are the arguments that name the repository or something in tests/, other than the values of
# pytest's usual options that take one (-k EXPR, --deselect ID, --ignore PATH, ...).
BROWSER_DIR="$(pwd -P)/tests/browser"
PICKED=0
PICKS_BROWSER=0
VALUE_NEXT=0
for arg in "$@"; do
  if [ "$VALUE_NEXT" = 1 ]; then VALUE_NEXT=0; continue; fi
  case "$arg" in
    -k|-m|-p|-c|-o|-W|-r|--deselect|--ignore|--ignore-glob|--basetemp|--rootdir|--confcutdir|--durations \
      |--maxfail|--tb|--junitxml|--junit-xml|--log-file|--import-mode|--capture|--override-ini|--config-file)
      VALUE_NEXT=1; continue ;;
    -*) continue ;;
  esac
  path="${arg%%::*}"
  if [ -d "$path" ]; then full="$(cd "$path" && pwd -P)"
  elif [ -e "$path" ]; then full="$(cd "$(dirname "$path")" && pwd -P)/$(basename "$path")"
  else continue; fi
  case "$full/" in "$(pwd -P)/" | "$(pwd -P)/tests/"*) ;; *) continue ;; esac
  PICKED=1
  case "$BROWSER_DIR/" in "$full/"*) PICKS_BROWSER=1 ;; esac
  case "$full/" in "$BROWSER_DIR/"*) PICKS_BROWSER=1 ;; esac
done

# The browser tests use HEADSEG_CHROMIUM when set (tests/browser/conftest.py), else /usr/bin/chromium.
if [ "$PICKED" = 1 ] && [ "$PICKS_BROWSER" = 0 ]; then
  :  # no browser test among the paths given
elif [ -n "${HEADSEG_CHROMIUM:-}" ]; then
  if [ ! -x "$HEADSEG_CHROMIUM" ]; then
    echo "[headseg] HEADSEG_CHROMIUM=$HEADSEG_CHROMIUM is not an executable: point it at a Chromium, or unset it" \
      "to use /usr/bin/chromium (installed with apt-get when missing)" >&2
    exit 1
  fi
elif [ ! -x /usr/bin/chromium ]; then
  echo "[headseg] installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  if ! command -v apt-get >/dev/null || { [ -n "$SUDO" ] && ! command -v sudo >/dev/null; } \
    || ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; }; then
    echo "[headseg] could not install chromium with apt-get${SUDO:+ (through sudo)}: install a Chromium and set" \
      "HEADSEG_CHROMIUM to its executable" >&2
    exit 1
  fi
fi

mkdir -p test-artifacts
export PYTHONUNBUFFERED=1
if [ "$#" -eq 0 ]; then set -- tests; fi
exec "$PY" -m pytest "$@"
