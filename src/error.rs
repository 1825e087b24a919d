//! The one error type that crosses from the store and the domain to the service layer, which maps it
//! to a `tonic::Status` in exactly one place (`service::status`).

use crate::domain::{OrderId, Violations};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request's parameters broke one or more rules; nothing was changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(Violations),

    /// The order given to create or update broke one or more rules; nothing was changed.
    #[error("invalid order: {0}")]
    InvalidOrder(Violations),

    #[error("order {0} not found")]
    OrderNotFound(OrderId),

    /// The order is shipped, and a shipped order cannot change or ship again.
    #[error("order {0} is already shipped and cannot change")]
    OrderAlreadyShipped(OrderId),

    /// One ProcessOrders stream named the same order twice.
    #[error("order {0} was already sent on this stream")]
    OrderRepeatedInStream(OrderId),

    /// The database could not be reached, or cannot serve the call right now; retrying later may
    /// succeed.
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
        let unavailable = match &err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => is_transient(db.as_ref()),
            _ => false,
        };
        if unavailable {
            Self::Unavailable(err)
        } else {
            Self::Database(err)
        }
    }
}

/// Whether the database reports that it cannot serve the call now but may soon, on this or another
/// connection.
fn is_transient(err: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = err.code() else {
        return false;
    };
    if err
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        code.parse().is_ok_and(is_transient_sqlite_code)
    } else {
        is_transient_sqlstate(&code)
    }
}

/// SQLite reports extended result codes, whose low byte is the primary code. SQLITE_BUSY and
/// SQLITE_LOCKED: another connection held the lock for longer than `busy_timeout`.
fn is_transient_sqlite_code(code: i32) -> bool {
    matches!(code & 0xff, 5 | 6)
}

/// PostgreSQL SQLSTATEs: connection exceptions (class 08), too many connections, and the server
/// shutting down, crashing or starting up (admin_shutdown, crash_shutdown, cannot_connect_now).
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "53300" | "57P01" | "57P02" | "57P03")
}

impl From<Violations> for Error {
    fn from(violations: Violations) -> Self {
        Self::InvalidArgument(violations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_database_codes_are_told_apart_from_the_rest() {
        for sqlstate in ["08006", "08001", "53300", "57P01", "57P03"] {
            assert!(is_transient_sqlstate(sqlstate), "{sqlstate}");
        }
        // unique_violation, undefined_table, serialization_failure.
        for sqlstate in ["23505", "42P01", "40001"] {
            assert!(!is_transient_sqlstate(sqlstate), "{sqlstate}");
        }
        // SQLITE_BUSY, SQLITE_BUSY_SNAPSHOT, SQLITE_LOCKED, SQLITE_LOCKED_SHAREDCACHE.
        for code in [5, 517, 6, 262] {
            assert!(is_transient_sqlite_code(code), "{code}");
        }
        // SQLITE_CONSTRAINT_UNIQUE, SQLITE_ERROR.
        for code in [2067, 1] {
            assert!(!is_transient_sqlite_code(code), "{code}");
        }
    }

    #[test]
    fn lost_connections_are_unavailable() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(matches!(
            Error::from(sqlx::Error::Io(reset)),
            Error::Unavailable(_)
        ));
        assert!(matches!(
            Error::from(sqlx::Error::PoolTimedOut),
            Error::Unavailable(_)
        ));
        assert!(matches!(
            Error::from(sqlx::Error::RowNotFound),
            Error::Database(_)
        ));
    }
}
