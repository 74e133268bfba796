-- Sagaflow's store. Everything lives in schema `sagaflow`.

CREATE TABLE sagaflow.instances (
    id uuid PRIMARY KEY,
    definition text NOT NULL,
    version integer NOT NULL,
    status text NOT NULL,
    state jsonb NOT NULL,
    idempotency_key text UNIQUE,
    traceparent text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    decided_by text NOT NULL
);
-- operator lists: by status, by definition, newest first
CREATE INDEX instances_status_created ON sagaflow.instances (status, created_at DESC);
CREATE INDEX instances_definition_created ON sagaflow.instances (definition, created_at DESC);

-- Every input and what it decided, append-only.
CREATE TABLE sagaflow.history (
    id bigserial PRIMARY KEY,
    saga_id uuid NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    node text NOT NULL,
    input_kind text NOT NULL,
    input jsonb NOT NULL,
    outcome text NOT NULL,
    detail text,
    status text NOT NULL,
    effects jsonb NOT NULL,
    input_bytes integer NOT NULL,
    state_bytes integer NOT NULL
);
CREATE INDEX history_saga ON sagaflow.history (saga_id, id);

-- Messages to publish: written in the deciding transaction, deleted after the broker confirmed.
CREATE TABLE sagaflow.outbox (
    id bigserial PRIMARY KEY,
    saga_id uuid NOT NULL,
    exchange text NOT NULL,
    routing_key text NOT NULL,
    mandatory boolean NOT NULL,
    envelope jsonb NOT NULL,
    body bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Ids of the messages already applied (replies, events, start requests).
CREATE TABLE sagaflow.inbox (
    message_id uuid PRIMARY KEY,
    saga_id uuid NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inbox_received ON sagaflow.inbox (received_at);

-- Durable timers: retries, step timeouts, escalations, wait and saga deadlines.
CREATE TABLE sagaflow.timers (
    saga_id uuid NOT NULL,
    key text NOT NULL,
    timer jsonb NOT NULL,
    due_ms bigint NOT NULL,
    PRIMARY KEY (saga_id, key)
);
CREATE INDEX timers_due ON sagaflow.timers (due_ms);
