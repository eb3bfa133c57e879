#!/usr/bin/env bash
# Screenshot one TensorBoard tab of a run, as a user sees it in a browser (headless Chromium).
#
#   scripts/tensorboard_screenshot.sh LOGDIR OUT.png [TAB] [WIDTHxHEIGHT]
#
# TAB is a TensorBoard plugin: custom_scalars (default), images, hparams, scalars, text.
# Needs chromium (Debian: apt-get install chromium) and tensorboard (the package's venv). The PNG is
# shrunk to at most 1200 px wide so that it stays small enough to commit.
set -euo pipefail
LOGDIR=${1:?usage: $0 LOGDIR OUT.png [TAB] [WIDTHxHEIGHT]}
OUT=${2:?usage: $0 LOGDIR OUT.png [TAB] [WIDTHxHEIGHT]}
TAB=${3:-custom_scalars}
SIZE=${4:-1400x1000}
PORT=${PORT:-6106}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
TB=$(dirname "$PY")/tensorboard

"$TB" --logdir "$LOGDIR" --host 127.0.0.1 --port "$PORT" >/dev/null 2>&1 &
TB_PID=$!
PROFILE=$(mktemp -d)
trap 'kill "$TB_PID" 2>/dev/null || true; rm -rf "$PROFILE"' EXIT
for _ in $(seq 60); do  # TensorBoard answers once it has read the logdir
  curl -sf "http://127.0.0.1:$PORT/data/runs" >/dev/null 2>&1 && break
  sleep 1
done
sleep 5
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$PROFILE" --hide-scrollbars \
  --window-size="${SIZE/x/,}" --virtual-time-budget=20000 --screenshot="$OUT" \
  "http://127.0.0.1:$PORT/#$TAB" >/dev/null 2>&1
"$PY" - "$OUT" <<'PYEOF'
import sys
from PIL import Image
path = sys.argv[1]
image = Image.open(path).convert("RGB")
if image.width > 1200:
    image = image.resize((1200, round(image.height * 1200 / image.width)), Image.LANCZOS)
image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
print(f"{path}: {image.width}x{image.height}")
PYEOF
