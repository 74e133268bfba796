//! Payment: charges and refunds.

use participants_sdk::{Context, Handler, HandlerError, HandlerResult, Participant, ParticipantConfig};

use crate::commands::{ChargePayment, PaymentCharged, RefundPayment};

/// The payment service.
pub struct Payments;

impl Handler<ChargePayment> for Payments {
    async fn handle(&self, cx: &mut Context<'_>, cmd: ChargePayment) -> HandlerResult<PaymentCharged> {
        if cmd.amount_cents <= 0 {
            return Err(HandlerError::reject("invalid_amount", format!("cannot charge {} cents", cmd.amount_cents)));
        }
        let key = cx.effect_key();
        sqlx::query("INSERT INTO example_payment.charges (effect_key, order_id, amount_cents) VALUES ($1, $2, $3)")
            .bind(&key)
            .bind(&cmd.order_id)
            .bind(cmd.amount_cents)
            .execute(cx.tx())
            .await?;
        Ok(PaymentCharged { charge_id: key })
    }
}

impl Handler<RefundPayment> for Payments {
    async fn handle(&self, cx: &mut Context<'_>, cmd: RefundPayment) -> HandlerResult<()> {
        // Idempotent, and a no-op when there was no charge.
        sqlx::query("UPDATE example_payment.charges SET refunded_at = clock_timestamp() WHERE order_id = $1 AND refunded_at IS NULL")
            .bind(&cmd.order_id)
            .execute(cx.tx())
            .await?;
        Ok(())
    }
}

/// The payment participant.
pub fn participant(config: ParticipantConfig) -> Result<Participant, participants_sdk::Error> {
    Participant::builder("payment").handle::<ChargePayment>(Payments).compensate::<RefundPayment>(Payments).config(config).build()
}
