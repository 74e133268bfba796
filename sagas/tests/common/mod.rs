//! Fixtures shared by the `sagas` test suites: an order saga and its commands.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::time::Duration;

use sagas::definition::StepBuilder;
use sagas::{Command, Event, OnDeadline, OnTimeout, RetryPolicy, SagaDefinition};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub id: u64,
    pub amount: u64,
    pub express: bool,
    pub reservation: Option<String>,
    pub charge: Option<String>,
    pub card: Option<String>,
}

macro_rules! command {
    ($ty:ident, $name:literal, $participant:literal, $reply:ty) => {
        impl Command for $ty {
            const NAME: &'static str = $name;
            const PARTICIPANT: &'static str = $participant;
            type Reply = $reply;
        }
    };
}

#[derive(Serialize, Deserialize)]
pub struct Reserve {
    pub order: u64,
}
#[derive(Serialize, Deserialize)]
pub struct Reserved {
    pub reservation: String,
}
command!(Reserve, "inventory.reserve", "inventory", Reserved);

#[derive(Serialize, Deserialize)]
pub struct Release {
    pub reservation: Option<String>,
}
command!(Release, "inventory.release", "inventory", ());

#[derive(Serialize, Deserialize)]
pub struct Charge {
    pub amount: u64,
}
#[derive(Serialize, Deserialize)]
pub struct Charged {
    pub charge: String,
}
command!(Charge, "payment.charge", "payment", Charged);

#[derive(Serialize, Deserialize)]
pub struct Refund {
    pub charge: Option<String>,
}
command!(Refund, "payment.refund", "payment", ());

#[derive(Serialize, Deserialize)]
pub struct Ship {
    pub order: u64,
    pub express: bool,
}
command!(Ship, "shipping.ship", "shipping", ());

#[derive(Serialize, Deserialize)]
pub struct Notify {
    pub channel: String,
}
command!(Notify, "notify.send", "notify", ());

#[derive(Serialize, Deserialize)]
pub struct Unnotify {
    pub channel: String,
}
command!(Unnotify, "notify.retract", "notify", ());

#[derive(Serialize, Deserialize)]
pub struct CardUpdated {
    pub card: String,
}
impl Event for CardUpdated {
    const NAME: &'static str = "customer.card_updated";
}

pub fn no_jitter(max: u32) -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(100), 2.0, max)
}

/// reserve → charge → ship, every step with a fixed-schedule retry policy.
pub fn order_saga() -> SagaDefinition<Order> {
    SagaDefinition::builder("order", 1)
        .step("reserve", |s| {
            s.invoke(|o: &Order| Reserve { order: o.id })
                .on_reply(|o, r: Reserved| o.reservation = Some(r.reservation))
                .compensate(|o| Release { reservation: o.reservation.clone() })
                .retry(no_jitter(3))
                .compensation_retry(no_jitter(3))
        })
        .step("charge", |s| {
            s.invoke(|o: &Order| Charge { amount: o.amount })
                .on_reply(|o, r: Charged| o.charge = Some(r.charge))
                .compensate(|o| Refund { charge: o.charge.clone() })
                .retry(no_jitter(3))
                .compensation_retry(no_jitter(3))
        })
        .step("ship", |s| s.invoke(|o: &Order| Ship { order: o.id, express: o.express }).retry(no_jitter(3)))
        .build()
        .expect("valid definition")
}

/// reserve → charge → ship, named `name`, with `charge` configured further by `charge`.
fn order_saga_charging(name: &str, charge: impl FnOnce(StepBuilder<Order, Charge>) -> StepBuilder<Order, Charge>) -> SagaDefinition<Order> {
    SagaDefinition::builder(name, 1)
        .step("reserve", |s| {
            s.invoke(|o: &Order| Reserve { order: o.id })
                .on_reply(|o, r: Reserved| o.reservation = Some(r.reservation))
                .compensate(|o| Release { reservation: o.reservation.clone() })
        })
        .step("charge", |s| {
            charge(
                s.invoke(|o: &Order| Charge { amount: o.amount })
                    .on_reply(|o, r: Charged| o.charge = Some(r.charge))
                    .compensate(|o| Refund { charge: o.charge.clone() }),
            )
        })
        .step("ship", |s| s.invoke(|o: &Order| Ship { order: o.id, express: o.express }))
        .build()
        .expect("valid definition")
}

/// Same steps, with a timeout on `charge` whose consequence is `then`.
pub fn order_saga_with_timeout(then: OnTimeout) -> SagaDefinition<Order> {
    order_saga_charging("order_timeout", |c| c.retry(no_jitter(2)).timeout(Duration::from_secs(5), then))
}

/// reserve → charge (a long step: heartbeat timeout 5 s, and `timeout` when given, 60 s) → ship
pub fn order_saga_with_heartbeat(timeout: Option<OnTimeout>) -> SagaDefinition<Order> {
    order_saga_charging("order_heartbeat", |c| {
        let c = c.retry(no_jitter(3)).heartbeat_timeout(Duration::from_secs(5));
        match timeout {
            Some(then) => c.timeout(Duration::from_secs(60), then),
            None => c,
        }
    })
}

/// reserve → charge (holds a slot of `payments`, capacity 2) → ship
pub fn order_saga_with_limit() -> SagaDefinition<Order> {
    order_saga_charging("order_limit", |c| c.retry(no_jitter(3)).limit("payments", 2))
}

/// reserve → parallel(email, sms, push) → ship
pub fn parallel_saga() -> SagaDefinition<Order> {
    SagaDefinition::builder("parallel_order", 1)
        .step("reserve", |s| s.invoke(|o: &Order| Reserve { order: o.id }).compensate(|o| Release { reservation: o.reservation.clone() }))
        .parallel("notify", |p| {
            p.branch("email", |s| {
                s.invoke(|_: &Order| Notify { channel: "email".into() }).compensate(|_| Unnotify { channel: "email".into() })
            })
            .branch("sms", |s| s.invoke(|_: &Order| Notify { channel: "sms".into() }).compensate(|_| Unnotify { channel: "sms".into() }))
            .branch("push", |s| s.invoke(|_: &Order| Notify { channel: "push".into() }).compensate(|_| Unnotify { channel: "push".into() }))
        })
        .step("ship", |s| s.invoke(|o: &Order| Ship { order: o.id, express: o.express }))
        .build()
        .expect("valid definition")
}

/// reserve → wait(card_updated) → charge
pub fn wait_saga(then: OnDeadline) -> SagaDefinition<Order> {
    SagaDefinition::builder("wait_order", 1)
        .step("reserve", |s| s.invoke(|o: &Order| Reserve { order: o.id }).compensate(|o| Release { reservation: o.reservation.clone() }))
        .wait("card", |w| w.on_event(|o: &mut Order, e: CardUpdated| o.card = Some(e.card)).deadline(Duration::from_secs(3600), then))
        .step("charge", |s| s.invoke(|o: &Order| Charge { amount: o.amount }))
        .build()
        .expect("valid definition")
}

/// reserve → charge (pivot) → ship (retriable), with a saga deadline.
pub fn pivot_saga() -> SagaDefinition<Order> {
    SagaDefinition::builder("pivot_order", 1)
        .step("reserve", |s| s.invoke(|o: &Order| Reserve { order: o.id }).compensate(|o| Release { reservation: o.reservation.clone() }))
        .step("charge", |s| s.invoke(|o: &Order| Charge { amount: o.amount }).pivot().retry(no_jitter(2)))
        .step("ship", |s| s.invoke(|o: &Order| Ship { order: o.id, express: o.express }).retriable().retry(no_jitter(3)))
        .deadline(Duration::from_secs(600))
        .build()
        .expect("valid definition")
}

pub fn order() -> Order {
    Order { id: 42, amount: 1999, express: false, ..Order::default() }
}

/// reserve → pay (child saga: `order_saga`, whose data is the order) → ship.
pub fn parent_saga() -> SagaDefinition<Order> {
    SagaDefinition::builder("parent_order", 1)
        .step("reserve", |s| {
            s.invoke(|o: &Order| Reserve { order: o.id })
                .on_reply(|o, r: Reserved| o.reservation = Some(r.reservation))
                .compensate(|o| Release { reservation: o.reservation.clone() })
        })
        .step("pay", |s| s.child(&order_saga(), |o: &Order| o.clone()).on_reply(|o, child: Order| o.charge = child.charge))
        .step("ship", |s| s.invoke(|o: &Order| Ship { order: o.id, express: o.express }))
        .build()
        .expect("valid definition")
}
