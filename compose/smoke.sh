#!/usr/bin/env bash
# Compose smoke test (CI runs it): build the release binaries and the images, bring the stack up,
# start orders through the HTTP API, check every one settles as expected (every 4th order ships to
# an address no carrier serves and is compensated), then take the stack down with its volumes.
#
#   compose/smoke.sh [orders]        (default 20; needs docker, docker-compose, curl and jq)
set -euo pipefail
cd "$(dirname "$0")/.."

orders="${1:-20}"
export SAGAFLOW_HTTP_PORT="${SAGAFLOW_HTTP_PORT:-18080}"
export SAGAFLOW_API_TOKEN="smoke-$(date +%s%N)-$RANDOM"
api="http://127.0.0.1:$SAGAFLOW_HTTP_PORT"
# The commands of compose/README.md, in a project of its own.
export COMPOSE_PROJECT_NAME=sagaflow-smoke

# The images take two binaries (compose/README.md builds their packages); the benchmark harness
# is built with them because .ci/run's benchmark step makes this same build: cargo unifies
# features over the packages one command builds, so a narrower set would compile the release again.
cargo build --release --locked -p sagaflow -p order-fulfilment -p bench
cd compose

down() {
    status=$?
    if [ "$status" -ne 0 ]; then
        echo "smoke: FAILED; the services' last log lines:"
        docker-compose logs --no-color --tail 40 || true
    fi
    docker-compose down --volumes >/dev/null 2>&1 || true
    exit "$status"
}
trap down EXIT

docker-compose config --quiet
docker-compose up -d --build

for _ in $(seq 1 90); do
    curl -fsS "$api/ready" >/dev/null 2>&1 && break
    sleep 1
done
curl -fsS "$api/ready" >/dev/null || { echo "smoke: the orchestrator is not ready at $api"; exit 1; }
echo "smoke: stack up, API at $api"
for p in inventory payment shipping; do
    health=
    for _ in $(seq 1 60); do
        health="$(docker inspect --format '{{.State.Health.Status}}' "$(docker-compose ps -q "$p")")"
        [ "$health" = healthy ] && break
        sleep 1
    done
    [ "$health" = healthy ] || { echo "smoke: participant $p is $health, not healthy"; exit 1; }
done
echo "smoke: participants healthy (consuming their queues)"

run="$(date +%s)"
ids=()
for n in $(seq 1 "$orders"); do
    destination="Main St $n, Springfield"
    if [ $((n % 4)) -eq 0 ]; then destination="unreachable"; fi
    body="$(jq -n --arg id "smoke-$run-$n" --arg dest "$destination" \
        '{definition: "order_fulfilment", idempotency_key: $id,
          input: {order_id: $id, sku: "widget", quantity: 1, amount_cents: 1999, destination: $dest}}')"
    id="$(curl -fsS -X POST "$api/sagas" -H "Authorization: Bearer $SAGAFLOW_API_TOKEN" -H 'Content-Type: application/json' -d "$body" |
        jq -r .saga_id)"
    ids+=("$id")
done

completed=0 compensated=0 other=0
for i in "${!ids[@]}"; do
    n=$((i + 1))
    status="$(curl -fsS "$api/sagas/${ids[$i]}/wait?timeout_ms=60000" -H "Authorization: Bearer $SAGAFLOW_API_TOKEN" | jq -r .saga.status)"
    want=completed
    if [ $((n % 4)) -eq 0 ]; then want=compensated; fi
    case "$status" in
        completed) completed=$((completed + 1)) ;;
        compensated) compensated=$((compensated + 1)) ;;
        *) other=$((other + 1)) ;;
    esac
    [ "$status" = "$want" ] || { echo "smoke: order $n (${ids[$i]}) is $status, expected $want"; exit 1; }
done
echo "smoke: orders=$orders completed=$completed compensated=$compensated other=$other"
