-- Schedules: sagas started by the clock (on a cron expression, or once at a time). Each row keeps
-- the next tick; a node that finds it due locks the row (others skip it), starts one saga per tick
-- with the idempotency key `schedule/{name}/{tick}` (a tick starts one saga whoever fires it,
-- however often), and moves the next tick on, in one transaction.
CREATE TABLE sagaflow.schedules (
    name text PRIMARY KEY,
    definition text NOT NULL,
    version integer,
    input json NOT NULL,
    cron text,
    at_ms bigint,
    missed text NOT NULL DEFAULT 'fire_once',
    priority integer NOT NULL DEFAULT 0,
    paused boolean NOT NULL DEFAULT false,
    next_ms bigint,
    last_tick_ms bigint,
    last_saga uuid,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (at_ms IS NULL))
);
CREATE INDEX schedules_due ON sagaflow.schedules (next_ms) WHERE NOT paused AND next_ms IS NOT NULL;
