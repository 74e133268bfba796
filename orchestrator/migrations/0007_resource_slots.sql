-- Shared-resource slots (`StepBuilder::limit`): the steps waiting for a slot of a resource, in
-- the order they take one (priority, then arrival), and the steps holding one. A decision
-- queues a step and gives a slot back in the same statement as the saga's state, so these rows
-- always agree with the sagas; granting moves waiters to holders under the resource's lock.
CREATE TABLE sagaflow.slot_waiters (
    seq bigserial NOT NULL,
    saga_id uuid NOT NULL,
    step integer NOT NULL,
    resource text NOT NULL,
    capacity integer NOT NULL,
    priority integer NOT NULL DEFAULT 0,
    since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step)
);
CREATE INDEX slot_waiters_order ON sagaflow.slot_waiters (resource, priority DESC, seq);

CREATE TABLE sagaflow.slot_holders (
    saga_id uuid NOT NULL,
    step integer NOT NULL,
    resource text NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step)
);
CREATE INDEX slot_holders_resource ON sagaflow.slot_holders (resource);
