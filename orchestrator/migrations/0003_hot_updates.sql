-- A running saga's updates stay HOT (heap-only tuples: no new index entry per update): no
-- index covers a column every update changes (retention finds finished sagas by `finished_at`,
-- set once when a saga completes or compensates, instead of `updated_at`), and each page keeps
-- room for the new versions of its rows.
ALTER TABLE sagaflow.instances ADD COLUMN finished_at timestamptz;
UPDATE sagaflow.instances SET finished_at = updated_at WHERE status IN ('completed', 'compensated');
DROP INDEX sagaflow.instances_finished;
CREATE INDEX instances_finished ON sagaflow.instances (finished_at) WHERE finished_at IS NOT NULL;
ALTER TABLE sagaflow.instances SET (fillfactor = 70);

-- The statuses a saga can be in (sagas::SagaStatus).
ALTER TABLE sagaflow.instances ADD CONSTRAINT instances_status
    CHECK (status IN ('created', 'running', 'compensating', 'completed', 'compensated', 'stopped'));
