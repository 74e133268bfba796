-- Retention: finished sagas by the time they finished (their last update).
CREATE INDEX instances_finished ON sagaflow.instances (updated_at) WHERE status IN ('completed', 'compensated');
