//! Your first saga: a signup that opens an account and then sends a welcome mail; when the mail
//! is refused, the account is closed again. The saga, its two participants (`accounts` and
//! `mail`) and the commands between them are here; `src/main.rs` is the orchestrator node,
//! `src/bin/participants.rs` runs the participants, and `tests/signup.rs` runs both against
//! real RabbitMQ and PostgreSQL.

use std::time::Duration;

use participants_sdk::{Context, Handler, HandlerError, HandlerResult, Participant, ParticipantConfig};
use sagas::{Command, OnTimeout, Registry, RetryPolicy, SagaDefinition};
use serde::{Deserialize, Serialize};

/// The saga's data: its input, and what the steps return.
#[derive(Serialize, Deserialize)]
pub struct Signup {
    /// The new user's address.
    pub email: String,
    /// The account the first step opened.
    #[serde(default)]
    pub account_id: Option<String>,
}

/// Open an account (participant `accounts`).
#[derive(Serialize, Deserialize)]
pub struct OpenAccount {
    /// The address.
    pub email: String,
}
/// The account opened.
#[derive(Serialize, Deserialize)]
pub struct AccountOpened {
    /// Its id.
    pub account_id: String,
}
impl Command for OpenAccount {
    const NAME: &'static str = "accounts.open";
    const PARTICIPANT: &'static str = "accounts";
    type Reply = AccountOpened;
}

/// Close the account again: the compensation of [`OpenAccount`].
#[derive(Serialize, Deserialize)]
pub struct CloseAccount {
    /// The account, if one was opened.
    pub account_id: Option<String>,
}
impl Command for CloseAccount {
    const NAME: &'static str = "accounts.close";
    const PARTICIPANT: &'static str = "accounts";
    type Reply = ();
}

/// Send the welcome mail (participant `mail`).
#[derive(Serialize, Deserialize)]
pub struct SendWelcome {
    /// The address.
    pub email: String,
}
impl Command for SendWelcome {
    const NAME: &'static str = "mail.send_welcome";
    const PARTICIPANT: &'static str = "mail";
    type Reply = ();
}

/// The saga: open the account (undone by closing it), then send the mail.
pub fn signup() -> sagas::Result<SagaDefinition<Signup>> {
    SagaDefinition::builder("signup", 1)
        .step("open_account", |s| {
            s.invoke(|d: &Signup| OpenAccount { email: d.email.clone() })
                .on_reply(|d, r: AccountOpened| d.account_id = Some(r.account_id))
                .compensate(|d: &Signup| CloseAccount { account_id: d.account_id.clone() })
        })
        .step("send_welcome", |s| {
            s.invoke(|d: &Signup| SendWelcome { email: d.email.clone() })
                .retry(RetryPolicy::exponential(Duration::from_millis(500), 2.0, 5))
                .timeout(Duration::from_secs(10), OnTimeout::Retry)
        })
        .build()
}

/// What the node serves.
pub fn registry() -> anyhow::Result<Registry> {
    let mut r = Registry::new();
    r.register(signup()?.erased())?;
    Ok(r)
}

/// The participants' tables.
pub async fn setup(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS accounts (id text PRIMARY KEY, email text NOT NULL);
         CREATE TABLE IF NOT EXISTS welcome_mails (account_email text PRIMARY KEY)",
    )
    .execute(pool)
    .await
    .map(drop)
}

struct Accounts;

impl Handler<OpenAccount> for Accounts {
    async fn handle(&self, cx: &mut Context<'_>, cmd: OpenAccount) -> HandlerResult<AccountOpened> {
        if !cmd.email.contains('@') {
            // A business refusal: nothing is written, the saga compensates.
            return Err(HandlerError::reject("invalid_email", "not an email address"));
        }
        let account_id = cx.effect_key(); // the same for every attempt of this step
        sqlx::query("INSERT INTO accounts (id, email) VALUES ($1, $2)").bind(&account_id).bind(&cmd.email).execute(cx.tx()).await?;
        Ok(AccountOpened { account_id })
    }
}

impl Handler<CloseAccount> for Accounts {
    async fn handle(&self, cx: &mut Context<'_>, cmd: CloseAccount) -> HandlerResult<()> {
        // Idempotent, and a no-op when the account was never opened.
        sqlx::query("DELETE FROM accounts WHERE id = $1").bind(cmd.account_id).execute(cx.tx()).await?;
        Ok(())
    }
}

struct Mail;

impl Handler<SendWelcome> for Mail {
    async fn handle(&self, cx: &mut Context<'_>, cmd: SendWelcome) -> HandlerResult<()> {
        if cmd.email.ends_with("@bounce.example") {
            return Err(HandlerError::reject("undeliverable", "the mail server refuses this address"));
        }
        sqlx::query("INSERT INTO welcome_mails (account_email) VALUES ($1)").bind(&cmd.email).execute(cx.tx()).await?;
        Ok(())
    }
}

/// The `accounts` participant.
pub fn accounts(config: ParticipantConfig) -> anyhow::Result<Participant> {
    Ok(Participant::builder("accounts").handle::<OpenAccount>(Accounts).compensate::<CloseAccount>(Accounts).config(config).build()?)
}

/// The `mail` participant.
pub fn mail(config: ParticipantConfig) -> anyhow::Result<Participant> {
    Ok(Participant::builder("mail").handle::<SendWelcome>(Mail).config(config).build()?)
}
