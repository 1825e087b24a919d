//! The one error type that crosses from the store and the domain to the service layer, which maps it
//! to a `tonic::Status` in exactly one place (`service::status`).

use crate::domain::{OrderId, Violations};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input broke one or more rules; nothing was changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(Violations),

    #[error("order {0} not found")]
    OrderNotFound(OrderId),

    /// The request is valid but the order is not in a state that allows it.
    #[error("{0}")]
    FailedPrecondition(String),

    /// The database could not be reached in time; retrying later may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),

    /// The database answered with an error that retrying will not fix.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),

    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),

    /// The database is reachable but lacks migrations this build embeds.
    #[error("database schema is behind: migrations {0:?} are not applied")]
    SchemaBehind(Vec<i64>),

    /// Stored data that no valid write could have produced.
    #[error("corrupt stored data: {0}")]
    CorruptData(String),
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(err),
            _ => Self::Database(err),
        }
    }
}

impl From<Violations> for Error {
    fn from(violations: Violations) -> Self {
        Self::InvalidArgument(violations)
    }
}
