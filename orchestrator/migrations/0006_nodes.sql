-- The nodes that take reply partitions (config `partitions`): each writes its row every second
-- with the partitions it consumes; a row not written for a few seconds is a node gone, and the
-- others share out its partitions. A node that stops deletes its row.
CREATE TABLE sagaflow.nodes (
    node_id text PRIMARY KEY,
    seen_at timestamptz NOT NULL,
    partitions integer[] NOT NULL DEFAULT '{}'
);
