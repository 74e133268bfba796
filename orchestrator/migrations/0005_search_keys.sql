-- The keys a saga is found by (a definition's search keys, e.g. `order_id`), written with the
-- instance when it starts; gone with it (retention).
CREATE TABLE sagaflow.search_keys (
    key text NOT NULL,
    value text NOT NULL,
    saga_id uuid NOT NULL REFERENCES sagaflow.instances (id) ON DELETE CASCADE,
    PRIMARY KEY (key, value, saga_id)
);
CREATE INDEX search_keys_saga ON sagaflow.search_keys (saga_id);
