//! Inventory: a reservation lowers the stock level, a release restores it.

use participants_sdk::{Context, Handler, HandlerError, HandlerResult, Participant, ParticipantConfig};

use crate::commands::{ReleaseStock, ReserveStock, StockReserved};

/// The inventory service.
pub struct Inventory;

impl Handler<ReserveStock> for Inventory {
    async fn handle(&self, cx: &mut Context<'_>, cmd: ReserveStock) -> HandlerResult<StockReserved> {
        if cmd.quantity <= 0 {
            return Err(HandlerError::reject("invalid_quantity", format!("cannot reserve {} units", cmd.quantity)));
        }
        let left: Option<i64> = sqlx::query_scalar(
            "UPDATE example_inventory.stock SET available = available - $2 WHERE sku = $1 AND available >= $2 RETURNING available",
        )
        .bind(&cmd.sku)
        .bind(cmd.quantity)
        .fetch_optional(cx.tx())
        .await?;
        if left.is_none() {
            return Err(HandlerError::reject("out_of_stock", format!("fewer than {} units of `{}` are available", cmd.quantity, cmd.sku)));
        }
        let key = cx.effect_key();
        sqlx::query("INSERT INTO example_inventory.reservations (effect_key, order_id, sku, quantity) VALUES ($1, $2, $3, $4)")
            .bind(&key)
            .bind(&cmd.order_id)
            .bind(&cmd.sku)
            .bind(cmd.quantity)
            .execute(cx.tx())
            .await?;
        Ok(StockReserved { reservation_id: key })
    }
}

impl Handler<ReleaseStock> for Inventory {
    async fn handle(&self, cx: &mut Context<'_>, cmd: ReleaseStock) -> HandlerResult<()> {
        // Idempotent, and a no-op when the reservation never happened.
        let released: Vec<(String, i64)> = sqlx::query_as(
            "UPDATE example_inventory.reservations SET released_at = clock_timestamp()
             WHERE order_id = $1 AND released_at IS NULL RETURNING sku, quantity",
        )
        .bind(&cmd.order_id)
        .fetch_all(cx.tx())
        .await?;
        for (sku, quantity) in released {
            sqlx::query("UPDATE example_inventory.stock SET available = available + $2 WHERE sku = $1")
                .bind(&sku)
                .bind(quantity)
                .execute(cx.tx())
                .await?;
        }
        Ok(())
    }
}

/// The inventory participant.
pub fn participant(config: ParticipantConfig) -> Result<Participant, participants_sdk::Error> {
    Participant::builder("inventory").handle::<ReserveStock>(Inventory).compensate::<ReleaseStock>(Inventory).config(config).build()
}
