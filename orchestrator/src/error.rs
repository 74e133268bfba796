//! The error of the library's public API: connecting, running and stopping a node or a client,
//! and waiting for a saga. (Starting sagas and operator requests have errors of their own:
//! [`crate::StartError`], [`crate::ops::OpsError`], whose kinds are [`ErrorKind`].)

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
    /// The registered definitions cannot run as they are (a child step names a definition that
    /// is not registered).
    #[error("{0}")]
    Definitions(String),
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

/// What kind of failure an operator request or an API call is ([`crate::ops::OpsError`]): its stable code (HTTP API `error.code`, CLI exit
/// message), from which the API takes its HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No such saga.
    NotFound,
    /// The saga's state refuses the action (or the input was ignored).
    Conflict,
    /// The request is malformed.
    InvalidRequest,
    /// No such definition (or version) is served.
    UnknownDefinition,
    /// The input does not decode as the definition's data.
    InvalidInput,
    /// PostgreSQL refuses the data itself: the same request fails the same way every time.
    Unstorable,
    /// The database, or a node that knows the saga's version, is not available: try again.
    Unavailable,
    /// The node is at a bound (`max_waiters`): try again shortly, or another node.
    Busy,
    /// The API token is missing or wrong.
    Unauthorized,
    /// Refused without a token (not a loopback host, another origin).
    Forbidden,
    /// The route does not take this method.
    MethodNotAllowed,
    /// The body is larger than `max_body_bytes`.
    PayloadTooLarge,
    /// The body is not JSON.
    UnsupportedMediaType,
}

impl ErrorKind {
    /// The stable code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::InvalidRequest => "invalid_request",
            Self::UnknownDefinition => "unknown_definition",
            Self::InvalidInput => "invalid_input",
            Self::Unstorable => "unstorable",
            Self::Unavailable => "unavailable",
            Self::Busy => "busy",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A result of the library's public API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Migrate(e)
    }
}
