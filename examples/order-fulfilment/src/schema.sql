SELECT pg_advisory_xact_lock(7210504914412);
CREATE SCHEMA IF NOT EXISTS example_inventory;
CREATE TABLE IF NOT EXISTS example_inventory.stock (
    sku text PRIMARY KEY,
    available bigint NOT NULL CHECK (available >= 0)
);
CREATE TABLE IF NOT EXISTS example_inventory.reservations (
    effect_key text PRIMARY KEY,
    order_id text NOT NULL,
    sku text NOT NULL,
    quantity bigint NOT NULL,
    reserved_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    released_at timestamptz
);
CREATE INDEX IF NOT EXISTS reservations_order ON example_inventory.reservations (order_id);
CREATE SCHEMA IF NOT EXISTS example_payment;
CREATE TABLE IF NOT EXISTS example_payment.charges (
    effect_key text PRIMARY KEY,
    order_id text NOT NULL,
    amount_cents bigint NOT NULL,
    charged_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    refunded_at timestamptz
);
CREATE INDEX IF NOT EXISTS charges_order ON example_payment.charges (order_id);
CREATE SCHEMA IF NOT EXISTS example_shipping;
CREATE TABLE IF NOT EXISTS example_shipping.shipments (
    effect_key text PRIMARY KEY,
    order_id text NOT NULL,
    destination text NOT NULL,
    shipped_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS shipments_order ON example_shipping.shipments (order_id);
