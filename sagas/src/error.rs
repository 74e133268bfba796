//! Errors of the `sagas` crate. Business failures (a rejected step, a stale reply, spent retries)
//! are not errors: they come back from `decide` as data in a [`Transition`](crate::Transition).

/// Errors of the saga model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A definition failed its checks at `build()`.
    #[error("invalid saga definition {name} v{version}: {reason}")]
    InvalidDefinition {
        /// Definition name.
        name: String,
        /// Definition version.
        version: u32,
        /// What is wrong, in words a developer can act on.
        reason: String,
    },
    /// `decide` was given a state pinned to another definition or version.
    #[error("saga instance is pinned to {state_name} v{state_version} but was given definition {def_name} v{def_version}")]
    DefinitionMismatch {
        /// The instance's definition name.
        state_name: String,
        /// The instance's definition version.
        state_version: u32,
        /// The definition passed in.
        def_name: String,
        /// The version passed in.
        def_version: u32,
    },
    /// The saga's data does not fit its definition's data type.
    #[error("invalid saga data: {0}")]
    InvalidData(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
