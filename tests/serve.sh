#!/usr/bin/env bash
# Sets up (once) and starts a local ComfyUI with the HeadSeg pack and its example workflows.
#
#   tests/serve.sh                      # http://127.0.0.1:8188, Ctrl-C to stop
#   tests/serve.sh --port 8190
#   tests/serve.sh --test-checkpoint    # also build/serve the random-weight SD2.1-architecture checkpoint
#   tests/serve.sh -- --preview-method auto    # anything after -- goes to ComfyUI's main.py
#
# Environment: HEADSEG_PORT (default 8188), HEADSEG_TEST_CHECKPOINT=1 (same as --test-checkpoint),
# HEADSEG_COMFYUI (use your own ComfyUI checkout instead of the pinned 0.3.75), HEADSEG_HOME
# (cache folder, default ~/.cache/headseg), HEADSEG_CPU=1 (sample on the CPU even when torch sees a
# GPU; by default ComfyUI uses the GPU when there is one and the CPU otherwise).
#
# The example workflows load "v2-1_512-ema-pruned.safetensors" (Stable Diffusion 2.1 base, 512 px).
# Put that file in $HEADSEG_HOME/models/checkpoints/ (or in ComfyUI's own models/checkpoints/).
set -euo pipefail
# An exported CDPATH has cd print the folder it found, into the $(cd ... && pwd) below.
unset CDPATH

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${HEADSEG_PORT:-8188}"
TEST_CKPT="${HEADSEG_TEST_CHECKPOINT:-0}"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT="${2:-}"; shift $(( $# > 1 ? 2 : 1 )) ;;
    --port=*) PORT="${1#--port=}"; shift ;;
    --test-checkpoint) TEST_CKPT=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# 0 would have ComfyUI listen on a port of the system's choosing (and this script name port 0); past
# 65535 the port check below failed on an OverflowError and called the port in use.
case "$PORT" in
  ''|*[!0-9]*) PORT_OK=0 ;;
  *) if [ "${#PORT}" -le 5 ] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ]; then PORT_OK=1; else PORT_OK=0; fi ;;
esac
if [ "$PORT_OK" = 0 ]; then
  echo "--port (or HEADSEG_PORT) needs a port number from 1 to 65535, got '$PORT'" >&2
  exit 2
fi

# venv, pinned ComfyUI (or $HEADSEG_COMFYUI)
# shellcheck source=tests/setup_env.sh
source "$REPO/tests/setup_env.sh"
# Held shared until the server ends: a setup for a checkout that needs other packages does not delete the
# venv under it (tests/setup_env.sh).
if command -v flock >/dev/null; then exec 8>>"$HEADSEG_HOME/.venv-users.lock"; flock -s 8; fi

# ComfyUI loads its own custom_nodes folder before the one made below: a HeadSeg installed there (README,
# "Install into an existing ComfyUI") would be the copy in use, and this checkout's nodes and web files
# left out (nodes/pack_folder.py). Say so instead of serving another copy.
for dir in "$HEADSEG_COMFYUI"/custom_nodes/*/; do
  dir="${dir%/}"
  case "$dir" in *.disabled) continue ;; esac
  if [ -f "$dir/__init__.py" ] \
    && grep -qE '^name[[:space:]]*=[[:space:]]*"headseg"[[:space:]]*$' "$dir/pyproject.toml" 2>/dev/null \
    && [ "$(cd "$dir" && pwd -P)" != "$(cd "$REPO" && pwd -P)" ]; then
    echo "[headseg] $dir holds HeadSeg too: ComfyUI loads it before this checkout, whose nodes and web" \
      "files are then left out. Move it out of custom_nodes (or rename it to $(basename "$dir").disabled)" \
      "to serve this checkout" >&2
    exit 1
  fi
done

# A port in use ends ComfyUI only after it has loaded everything, with a traceback: say so first.
if ! "$PY" -c '
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        sys.exit(1)' "$PORT"; then
  echo "[headseg] port $PORT on 127.0.0.1 is in use (another ComfyUI, or an earlier tests/serve.sh still" \
    "running?): stop that server, or choose another port with --port N" >&2
  exit 1
fi

CKPT_DIR="$HEADSEG_HOME/models/checkpoints"
# One folder per checkout, with its own custom_nodes/HeadSeg link to this checkout and its own
# extra-model-paths file: a server keeps serving the checkout it was started from (its Python, its
# web files, its workflows) whatever another checkout sets up meanwhile.
SERVE_DIR="$HEADSEG_HOME/serve/$(printf '%s' "$REPO" | cksum | cut -d' ' -f1)"
mkdir -p "$CKPT_DIR" "$SERVE_DIR/custom_nodes"
ln -sfn "$REPO" "$SERVE_DIR/custom_nodes/HeadSeg"

if [ "$TEST_CKPT" = "1" ]; then
  TEST_PATH="$(cd "$REPO" && "$PY" tests/support/checkpoint.py | tail -n 1)"
  echo "[headseg] random-weight test checkpoint: $(basename "$TEST_PATH")"
  echo "          (SD2.1 architecture, random weights: pictures are noise, masks are meaningless;"
  echo "           choose it in Load Checkpoint to try the plumbing without real weights)"
fi

YAML="$SERVE_DIR/extra_model_paths.yaml"
# Folders as single-quoted YAML strings (a quote inside doubled): unquoted, a HEADSEG_HOME with " #"
# in its name was cut there (ComfyUI then loaded no pack) and one with ": " made the file unreadable.
yaml_quote() { local q="'"; printf "'%s'" "${1//$q/$q$q}"; }
cat > "$YAML" <<EOF
headseg:
    custom_nodes: $(yaml_quote "$SERVE_DIR/custom_nodes")
    checkpoints: $(yaml_quote "$CKPT_DIR")
EOF

SD21="v2-1_512-ema-pruned.safetensors"
if [ -f "$CKPT_DIR/$SD21" ] || [ -f "$HEADSEG_COMFYUI/models/checkpoints/$SD21" ]; then
  echo "[headseg] found $SD21: the example workflows are ready to queue"
else
  cat <<EOF
[headseg] no SD2.1 checkpoint found. The example workflows load "$SD21"
          (Stable Diffusion 2.1 base, 512 px, from stabilityai/stable-diffusion-2-1-base). Put it in
              $CKPT_DIR/$SD21
          or  $HEADSEG_COMFYUI/models/checkpoints/$SD21
          and reload the page. Without it the workflows still open, but queueing them stops at
          Load Checkpoint ("Value not in list: ckpt_name"); a recording saved earlier can still be
          turned into masks with HeadSeg Load Recording, which needs no model. To try the
          plumbing without real weights: tests/serve.sh --test-checkpoint (noise pictures).
EOF
fi

# ComfyUI needs --cpu on a machine without a GPU: pass it only when torch
# sees no GPU (or HEADSEG_CPU=1 asks for the CPU).
CPU_FLAG=()
if [ "${HEADSEG_CPU:-auto}" = "1" ]; then
  CPU_FLAG=(--cpu)
elif [ "${HEADSEG_CPU:-auto}" != "0" ] && ! "$PY" -c '
import sys, torch
mps = getattr(torch.backends, "mps", None)
sys.exit(0 if torch.cuda.is_available() or (mps is not None and mps.is_available()) else 1)'; then
  CPU_FLAG=(--cpu)
fi
if [ ${#CPU_FLAG[@]} -gt 0 ]; then echo "[headseg] sampling on the CPU"; else echo "[headseg] sampling on the GPU"; fi

echo "[headseg] ComfyUI: $HEADSEG_COMFYUI"
echo "[headseg] open http://127.0.0.1:$PORT  ->  ComfyUI menu (the logo, top left) > Browse Templates > HeadSeg"
cd "$HEADSEG_COMFYUI"
exec "$PY" main.py "${CPU_FLAG[@]}" --listen 127.0.0.1 --port "$PORT" \
  --extra-model-paths-config "$YAML" \
  --database-url "sqlite:///:memory:" --disable-auto-launch "${EXTRA[@]}"
