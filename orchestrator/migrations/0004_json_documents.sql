-- Documents the store writes whole and reads back whole (never queried inside by the runtime)
-- are `json`, not `jsonb`: PostgreSQL checks `json` and keeps its text, where `jsonb` is parsed
-- into a binary form on every write and printed back on every read.
ALTER TABLE sagaflow.instances ALTER COLUMN state TYPE json USING state::json;
ALTER TABLE sagaflow.history ALTER COLUMN input TYPE json USING input::json,
                             ALTER COLUMN effects TYPE json USING effects::json;
ALTER TABLE sagaflow.outbox ALTER COLUMN envelope TYPE json USING envelope::json;
ALTER TABLE sagaflow.timers ALTER COLUMN timer TYPE json USING timer::json;
