//! The error of the library's public API: connecting, running and stopping a node or a client,
//! and waiting for a saga. (Starting sagas and operator requests have errors of their own:
//! [`crate::StartError`], [`crate::ops::OpsError`].)

use std::time::Duration;

use sagas::{SagaId, SagaStatus};

use crate::config::ConfigError;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// PostgreSQL could not be reached, or refused or failed a statement; `doing` says what the
    /// node was doing.
    #[error("{doing}: {cause}")]
    Database {
        /// What failed, in words (with the address, its password hidden).
        doing: String,
        /// The driver's error (shown in the message, so not also a `source`).
        cause: sqlx::Error,
    },
    /// The migrations failed.
    #[error("running the migrations: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// RabbitMQ could not be reached, or refused the topology or a channel.
    #[error("{doing}: {cause}")]
    Amqp {
        /// What failed, in words (with the address, its password hidden).
        doing: String,
        /// The client's error (shown in the message).
        cause: lapin::Error,
    },
    /// The API's address could not be bound.
    #[error("{doing}: {cause}")]
    Io {
        /// What failed, in words.
        doing: String,
        /// The error (shown in the message).
        cause: std::io::Error,
    },
    /// A task of the node failed, panicked or stopped on its own (it is named).
    #[error("{0}")]
    Task(String),
    /// No saga has this id.
    #[error("no saga {0}")]
    NoSuchSaga(SagaId),
    /// The saga did not settle in the time given.
    #[error("saga {id} is still {} after {waited:?}", status.as_str())]
    NotSettled {
        /// The saga.
        id: SagaId,
        /// Its status when the time was up.
        status: SagaStatus,
        /// How long was waited.
        waited: Duration,
    },
}

impl Error {
    pub(crate) fn database(doing: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Self {
        let doing = doing.into();
        move |cause| Self::Database { doing, cause }
    }

    pub(crate) fn amqp(doing: impl Into<String>) -> impl FnOnce(lapin::Error) -> Self {
        let doing = doing.into();
        move |cause| Self::Amqp { doing, cause }
    }

    pub(crate) fn io(doing: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let doing = doing.into();
        move |cause| Self::Io { doing, cause }
    }
}

/// A result of the library's public API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Migrate(e)
    }
}
