//! Persistence: the `OrderStore` trait and its two implementations, SQLite (the embedded default) and
//! PostgreSQL (production). Knows SQL, knows nothing of gRPC.

mod instrumented;
#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;

use std::{
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use futures::stream::BoxStream;
use platform::telemetry::metrics::{PoolStatus, StoreInstruments};
use sqlx::{
    Database, Pool, SqlSafeStr, Transaction,
    migrate::{Migrate, Migrator},
    pool::PoolConnection,
};

use crate::{
    config::{Backend, DatabaseSettings},
    domain::{Order, OrderDetails, OrderId, OrderUpdate, RequestId},
    error::{Error, Result},
};

#[cfg(feature = "postgres")]
pub use self::postgres::PostgresStore;
pub use self::{instrumented::Instrumented, sqlite::SqliteStore};

/// Orders as they are read from the database, one at a time.
pub type OrderStream = BoxStream<'static, Result<Order>>;

/// Where a page of `list` starts: after the order at this position in creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCursor(i64);

impl PageCursor {
    pub fn new(position: i64) -> Self {
        Self(position)
    }

    pub fn position(self) -> i64 {
        self.0
    }
}

/// One page of orders in creation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub orders: Vec<Order>,
    /// Where the next page starts; `None` after the last order.
    pub next: Option<PageCursor>,
}

#[async_trait]
pub trait OrderStore: Send + Sync + 'static {
    /// Stores a new pending order. With a `request_id` already used, returns the order that request
    /// created and stores nothing, also when the two requests race.
    async fn create(&self, details: &OrderDetails, request_id: Option<&RequestId>)
    -> Result<Order>;

    async fn get(&self, id: OrderId) -> Result<Order>;

    /// Up to `page_size` orders after `after` (from the first order when `None`), in creation order.
    async fn list(&self, after: Option<PageCursor>, page_size: u32) -> Result<Page>;

    /// Every order whose items or description contain `query`, ignoring case, streamed as the rows are
    /// read so memory does not grow with the number of matches.
    fn search(&self, query: &str) -> OrderStream;

    /// Applies all updates in one transaction: all of them, or none when any order is unknown or
    /// already shipped.
    async fn update(&self, updates: &[OrderUpdate]) -> Result<()>;

    /// Marks pending orders shipped in one transaction and returns them as stored.
    async fn ship(&self, ids: &[OrderId]) -> Result<Vec<Order>>;

    /// Applies the embedded migrations that are not applied yet.
    async fn migrate(&self) -> Result<()>;

    /// Succeeds when the database answers and every embedded migration is applied.
    async fn check_ready(&self) -> Result<()>;

    /// Closes the pool, waiting for connections in use to be returned.
    async fn close(&self);

    /// The database system, as OpenTelemetry names it (`db.system`): `sqlite`, `postgresql`.
    fn system(&self) -> &'static str;

    /// The pool's connections right now.
    fn pool_status(&self) -> PoolStatus;
}

/// The pool's connections now, for the metrics.
fn pool_status<DB: Database>(pool: &Pool<DB>) -> PoolStatus {
    PoolStatus {
        size: pool.size(),
        idle: u32::try_from(pool.num_idle()).unwrap_or(u32::MAX),
        max: pool.options().get_max_connections(),
    }
}

/// Builds the store that `settings.url` selects, recording into `instruments`. Opens no connection:
/// the pool connects on first use, so the server can start (and report NOT_SERVING) while the
/// database is still unreachable.
pub fn connect(
    settings: &DatabaseSettings,
    instruments: &StoreInstruments,
) -> Result<Arc<dyn OrderStore>> {
    Ok(match settings.url.backend() {
        Backend::Sqlite => Arc::new(SqliteStore::connect_lazy(settings, instruments)?),
        #[cfg(feature = "postgres")]
        Backend::Postgres => Arc::new(PostgresStore::connect_lazy(settings, instruments)?),
    })
}

/// While the database looks down, the longest a call waits for a connection: long enough to open one
/// to a database that is back, short enough that calls fail fast during an outage. An acquire that
/// takes longer while the pool could open a connection is what marks the database down.
const OUTAGE_ACQUIRE_TIMEOUT: Duration = Duration::from_millis(250);

/// How a store takes its connections: the wait is recorded, and an outage makes calls fail fast.
#[derive(Debug, Clone)]
struct Acquire {
    instruments: StoreInstruments,
    /// The last attempt failed with connections to spare: the database is unreachable, not busy.
    /// The first success (a call's, or a health check's) clears it.
    outage: Arc<AtomicBool>,
}

impl Acquire {
    fn new(instruments: &StoreInstruments) -> Self {
        Self {
            instruments: instruments.clone(),
            outage: Arc::default(),
        }
    }
}

/// Takes a connection from `pool`, recording the wait. However that fails (the pool timed out or is
/// closed; the database refused the connection, reset it or cut its handshake short), this call
/// cannot reach the database and a retry later may: it is UNAVAILABLE whatever kind of error the
/// driver reports. During an outage the wait is bounded by [`OUTAGE_ACQUIRE_TIMEOUT`] instead of
/// `database.acquire_timeout` (sqlx keeps retrying a refused connection until its timeout).
async fn connection<DB: Database>(
    pool: &Pool<DB>,
    acquire: &Acquire,
) -> Result<PoolConnection<DB>> {
    let in_outage = acquire.outage.load(Ordering::Relaxed);
    take(pool, acquire, in_outage).await
}

/// [`connection`] for the health check, never cut short by an outage: it is how the database is
/// found back, also when opening a connection to it takes longer than the outage bound.
async fn connection_for_check<DB: Database>(
    pool: &Pool<DB>,
    acquire: &Acquire,
) -> Result<PoolConnection<DB>> {
    take(pool, acquire, false).await
}

async fn take<DB: Database>(
    pool: &Pool<DB>,
    acquire: &Acquire,
    cut_short: bool,
) -> Result<PoolConnection<DB>> {
    // Every connection busy is overload, which waiting in the pool is for; fewer open than allowed
    // and none to be had is an outage.
    let could_open = || pool.size() < pool.options().get_max_connections();
    let started = Instant::now();
    let mut acquiring = pin!(pool.acquire());
    let acquired = match tokio::time::timeout(OUTAGE_ACQUIRE_TIMEOUT, acquiring.as_mut()).await {
        Ok(acquired) => acquired,
        Err(_) => {
            // Noted now rather than when the acquire gives up, which the caller's deadline may
            // never let it reach.
            if could_open() {
                acquire.outage.store(true, Ordering::Relaxed);
            }
            if cut_short {
                Err(sqlx::Error::PoolTimedOut)
            } else {
                acquiring.await
            }
        }
    };
    acquire
        .instruments
        .connection_wait(started.elapsed().as_secs_f64());
    match acquired {
        Ok(conn) => {
            if acquire.outage.load(Ordering::Relaxed) {
                acquire.outage.store(false, Ordering::Relaxed);
            }
            Ok(conn)
        }
        Err(err) => {
            if could_open() {
                acquire.outage.store(true, Ordering::Relaxed);
            }
            Err(Error::Unavailable(err))
        }
    }
}

/// Starts a transaction with `begin` (`BEGIN`, or a backend's own variant) on a connection taken as
/// [`connection`] takes it.
async fn transaction<DB: Database>(
    pool: &Pool<DB>,
    acquire: &Acquire,
    begin: &'static str,
) -> Result<Transaction<'static, DB>> {
    let conn = connection(pool, acquire).await?;
    Ok(Transaction::begin(conn, Some(begin.into_sql_str())).await?)
}

/// The table in which sqlx records applied migrations.
const MIGRATIONS_TABLE: &str = "_sqlx_migrations";

/// After a rollback the database holds migrations that this older binary does not know. Migrations are
/// expand/contract (deploy/README.md), so that schema is one it runs on: `migrate` succeeds on it, as
/// readiness does (`ensure_schema_current` asks only for the binary's own migrations).
fn tolerating_newer_schemas(mut migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    migrator.set_ignore_missing(true);
    migrator
}

/// Fails unless every migration `migrator` embeds has been applied successfully on `conn`.
async fn ensure_schema_current(conn: &mut impl Migrate, migrator: &Migrator) -> Result<()> {
    let applied = conn.list_applied_migrations(MIGRATIONS_TABLE).await?;
    let missing: Vec<i64> = migrator
        .iter()
        .filter(|migration| !migration.migration_type.is_down_migration())
        .map(|migration| migration.version)
        .filter(|version| !applied.iter().any(|done| done.version == *version))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::SchemaBehind(missing))
    }
}

/// The error for a conditional write that matched no row: the order is missing, or not pending.
fn not_pending(id: OrderId, exists: bool) -> Error {
    if exists {
        Error::OrderAlreadyShipped(id)
    } else {
        Error::OrderNotFound(id)
    }
}

/// Turns the rows of a `list` query, which asks for one row more than `page_size`, into a page.
fn page_from_rows<Row>(
    mut rows: Vec<Row>,
    page_size: u32,
    position: impl Fn(&Row) -> i64,
    into_order: impl Fn(Row) -> Result<Order>,
) -> Result<Page> {
    let page_size = usize::try_from(page_size).unwrap_or(usize::MAX);
    let has_more = rows.len() > page_size;
    rows.truncate(page_size);
    let next = match rows.last() {
        Some(last) if has_more => Some(PageCursor(position(last))),
        _ => None,
    };
    let orders = rows.into_iter().map(into_order).collect::<Result<_>>()?;
    Ok(Page { orders, next })
}
