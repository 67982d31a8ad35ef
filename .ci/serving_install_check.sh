#!/usr/bin/env bash
# The README's serving install (`pip install -c constraints.txt -e .`, no extras) in a venv of its own: TensorFlow
# is not installed, the shipped model is served on LiteRT, and a real radiograph is scored and
# explained. The test suite's venv has TensorFlow (the `dev` extra), so this is the only check
# of the serving install outside the container check (which may be SKIPPED).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/pneumoscan-serving-XXXXXX)"
KEY="serving-install-key-0123456789"
PID=""
cleanup() {
  local status=$?
  set +e
  [[ -n "$PID" ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  [[ $status -ne 0 ]] && { echo "[serving] FAILED (exit $status); server log:" >&2; tail -n 30 "$WORK/server.log" >&2; }
  rm -rf "$WORK"
}
trap cleanup EXIT

cd "$ROOT"
python3.11 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q -c constraints.txt -e . >"$WORK/pip.log" 2>&1 \
  || { grep -v "is ignored: it is neither" "$WORK/pip.log" | tail -n 20; exit 1; }
"$WORK/venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('tensorflow') is not None)" \
  || { echo "[serving] the serving install has TensorFlow"; exit 1; }
echo "[serving] installed without TensorFlow: $(du -sm "$WORK/venv" | cut -f1) MB"
PORT="$(python3.11 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
PNEUMOSCAN_API_KEYS="$KEY" PNEUMOSCAN_DATA_DIR="$WORK/data" \
  "$WORK/venv/bin/pneumoscan" serve --host 127.0.0.1 --port "$PORT" >"$WORK/server.log" 2>&1 &
PID=$!
"$WORK/venv/bin/python" "$ROOT/.ci/smoke.py" "http://127.0.0.1:$PORT" "$KEY" \
  "$ROOT/tests/fixtures/originals/person495_bacteria_2094.jpeg" --tag serving --label PNEUMONIA
echo "[serving] OK"
