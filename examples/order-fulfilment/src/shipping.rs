//! Shipping: records shipments; refuses destinations it cannot serve and, on request, fails
//! transiently a few times first.

use participants_sdk::{Context, Handler, HandlerError, HandlerResult, Participant, ParticipantConfig};

use crate::UNREACHABLE;
use crate::commands::{OrderShipped, ShipOrder};

/// The shipping service.
pub struct Shipping;

impl Handler<ShipOrder> for Shipping {
    async fn handle(&self, cx: &mut Context<'_>, cmd: ShipOrder) -> HandlerResult<OrderShipped> {
        if cmd.destination == UNREACHABLE {
            return Err(HandlerError::reject("no_carrier", format!("no carrier delivers to `{}`", cmd.destination)));
        }
        if cx.attempt() <= cmd.flaky_attempts {
            return Err(HandlerError::Transient(anyhow::anyhow!("carrier API unavailable (attempt {})", cx.attempt())));
        }
        let key = cx.effect_key();
        sqlx::query("INSERT INTO example_shipping.shipments (effect_key, order_id, destination) VALUES ($1, $2, $3)")
            .bind(&key)
            .bind(&cmd.order_id)
            .bind(&cmd.destination)
            .execute(cx.tx())
            .await?;
        Ok(OrderShipped { shipment_id: key })
    }
}

/// The shipping participant.
pub fn participant(config: ParticipantConfig) -> Result<Participant, participants_sdk::Error> {
    Participant::builder("shipping").handle::<ShipOrder>(Shipping).config(config).build()
}
