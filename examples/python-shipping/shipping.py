"""The order example's shipping participant, in Python, written from docs/protocol.md alone.

It consumes `{ns}.participant.shipping`, ships orders into its own table
(`py_shipping.shipments`), refuses the destination "unreachable" (code `no_carrier`), fails
transiently for the first `flaky_attempts` attempts, and follows the protocol's rules: the
outcome of each step is recorded with the business write in one transaction, a redelivery or
a later attempt is answered from that record, replies are published with confirms before the
command is acked, and a message it cannot handle is dead-lettered with a reason.

Environment: SAGAFLOW_AMQP_URL, SAGAFLOW_DATABASE_URL, SAGAFLOW_NAMESPACE (default sagaflow).
Needs `pika` and `psycopg` from PyPI (see requirements.txt).
"""

import json
import logging
import os
import signal
import sys
import time
import uuid

import pika
import psycopg

NAMESPACE_UUID = uuid.UUID("6f1c7a3e-5d2b-4c8e-9a1f-2b7d0e4c9a55")
PARTICIPANT = "shipping"
COMMAND = "shipping.ship"
MAX_BODY = 1024 * 1024
REQUIRED_HEADERS = ("x-saga-id", "x-saga-definition", "x-saga-version", "x-saga-step",
                    "x-saga-step-name", "x-saga-kind", "x-saga-attempt")
INT_HEADERS = ("x-saga-version", "x-saga-step", "x-saga-attempt")

log = logging.getLogger("py-shipping")


class Refused(Exception):
    """A message that goes to the dead-letter queue: (reason code, detail)."""

    def __init__(self, reason, detail):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def schema(db):
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(7210504914413)")
        db.execute("CREATE SCHEMA IF NOT EXISTS py_shipping")
        db.execute("""CREATE TABLE IF NOT EXISTS py_shipping.shipments (
            effect_key text PRIMARY KEY, order_id text NOT NULL, destination text NOT NULL,
            shipped_at timestamptz NOT NULL DEFAULT clock_timestamp())""")
        db.execute("""CREATE TABLE IF NOT EXISTS py_shipping.inbox (
            saga_id uuid NOT NULL, step integer NOT NULL, kind text NOT NULL, outcome jsonb NOT NULL,
            PRIMARY KEY (saga_id, step, kind))""")


def declare(ch, ns):
    queue = f"{ns}.participant.{PARTICIPANT}"
    dlx = f"{ns}.dead-letter"
    ch.exchange_declare(dlx, exchange_type="direct", durable=True)
    ch.queue_declare(f"{queue}.dead-letter", durable=True)
    ch.queue_bind(f"{queue}.dead-letter", dlx, routing_key=queue)
    ch.queue_declare(queue, durable=True, arguments={
        "x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": queue})
    ch.exchange_declare(f"{ns}.commands", exchange_type="direct", durable=True)
    ch.queue_bind(queue, f"{ns}.commands", routing_key=PARTICIPANT)
    return queue, dlx


def parse(props, body):
    """Validate a command as docs/protocol.md describes; returns (headers, body dict)."""
    if len(body) > MAX_BODY:
        raise Refused("oversized", f"body of {len(body)} bytes exceeds {MAX_BODY}")
    for name in ("message_id", "type", "reply_to"):
        if not getattr(props, name):
            raise Refused("invalid_properties", f"missing `{name}`")
    try:
        uuid.UUID(props.message_id)
    except ValueError:
        raise Refused("invalid_properties", f"message_id `{props.message_id}` is not a UUID")
    headers = dict(props.headers or {})
    for name in REQUIRED_HEADERS:
        if name not in headers:
            raise Refused("invalid_headers", f"missing header `{name}`")
    for name in INT_HEADERS:
        value = headers[name]
        if isinstance(value, bytes):
            value = value.decode()
        try:
            headers[name] = int(value)
        except (TypeError, ValueError):
            raise Refused("invalid_headers", f"header `{name}` is not an integer")
    for name in ("x-saga-id", "x-saga-kind", "x-saga-step-name", "x-saga-definition"):
        if isinstance(headers[name], bytes):
            headers[name] = headers[name].decode()
    if props.type != COMMAND or headers["x-saga-kind"] != "invoke":
        raise Refused("unknown_command", f"this participant has no handler for `{props.type}` ({headers['x-saga-kind']})")
    try:
        data = json.loads(body)
        order_id, destination = data["order_id"], data["destination"]
        flaky = int(data.get("flaky_attempts", 0))
    except (ValueError, KeyError, TypeError) as e:
        raise Refused("malformed_body", f"not a shipping.ship body: {e}")
    return headers, (order_id, destination, flaky)


def handle(db, headers, command):
    """Run the command once in effect; returns the reply outcome."""
    order_id, destination, flaky = command
    saga, step, attempt = headers["x-saga-id"], headers["x-saga-step"], headers["x-saga-attempt"]
    while True:
        try:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"py-shipping/{saga}/{step}",))
                row = db.execute("SELECT outcome FROM py_shipping.inbox WHERE saga_id = %s AND step = %s AND kind = 'invoke'",
                                 (saga, step)).fetchone()
                if row:
                    return row[0]
                if destination == "unreachable":
                    outcome = {"type": "rejected", "code": "no_carrier", "message": f"no carrier delivers to `{destination}`"}
                elif attempt <= flaky:
                    # Transient: nothing is recorded, the orchestrator retries with a new attempt.
                    return {"type": "transient_failure", "message": f"carrier API unavailable (attempt {attempt})"}
                else:
                    key = f"{saga}/{step}/invoke"
                    db.execute("INSERT INTO py_shipping.shipments (effect_key, order_id, destination) VALUES (%s, %s, %s)",
                               (key, order_id, destination))
                    outcome = {"type": "success", "output": {"shipment_id": key}}
                db.execute("INSERT INTO py_shipping.inbox (saga_id, step, kind, outcome) VALUES (%s, %s, 'invoke', %s)",
                           (saga, step, json.dumps(outcome)))
                return outcome
        except psycopg.errors.UniqueViolation:
            continue  # another delivery recorded it first: answer from its record


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s py-shipping %(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    ns = os.environ.get("SAGAFLOW_NAMESPACE", "sagaflow")
    db = psycopg.connect(os.environ.get("SAGAFLOW_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"), autocommit=True)
    schema(db)
    params = pika.URLParameters(os.environ.get("SAGAFLOW_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()
    queue, dlx = declare(ch, ns)
    ch.basic_qos(prefetch_count=16)

    def on_command(ch, method, props, body):
        try:
            headers, command = parse(props, body)
        except Refused as r:
            log.warning("dead-lettering a message: %s: %s", r.reason, r.detail)
            dead = dict(props.headers or {})
            dead.update({"x-dead-letter-reason": r.reason, "x-dead-letter-detail": r.detail})
            props.headers = dead
            ch.basic_publish(dlx, queue, body, props)
            ch.basic_ack(method.delivery_tag)
            return
        outcome = handle(db, headers, command)
        reply_headers = {k: headers[k] for k in REQUIRED_HEADERS}
        if (props.headers or {}).get("traceparent"):
            reply_headers["traceparent"] = props.headers["traceparent"]
        reply = pika.BasicProperties(
            message_id=str(uuid.uuid5(NAMESPACE_UUID, f"{props.message_id}/reply")),
            correlation_id=props.message_id, type="sagaflow.reply", content_type="application/json",
            timestamp=int(time.time()), delivery_mode=2, headers=reply_headers)
        ch.basic_publish("", props.reply_to, json.dumps(outcome).encode(), reply, mandatory=True)
        ch.basic_ack(method.delivery_tag)
        log.info("%s %s attempt %s: %s", headers["x-saga-id"], headers["x-saga-step-name"], headers["x-saga-attempt"], outcome["type"])

    def stop(*_):
        ch.stop_consuming()

    signal.signal(signal.SIGTERM, stop)
    ch.basic_consume(queue, on_command)
    log.info("consuming %s", queue)
    print("py-shipping: ready", flush=True)
    try:
        ch.start_consuming()
    finally:
        conn.close()
        db.close()


if __name__ == "__main__":
    sys.exit(main())
