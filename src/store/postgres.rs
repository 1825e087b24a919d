//! The PostgreSQL store, for production.

use std::{str::FromStr, sync::LazyLock, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use platform::telemetry::metrics::StoreInstruments;
use sqlx::{
    Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

use super::{
    Acquire, OrderStore, OrderStream, Page, PageCursor, PoolStatus, ensure_schema_current,
    not_pending,
};
use crate::{
    config::DatabaseSettings,
    domain::{self, Order, OrderDetails, OrderId, OrderStatus, OrderUpdate, RequestId},
    error::{Error, Result},
};

static MIGRATOR: LazyLock<sqlx::migrate::Migrator> =
    LazyLock::new(|| super::tolerating_newer_schemas(sqlx::migrate!("migrations/postgres")));

/// The columns every query returns, in the order `OrderRow` reads them.
macro_rules! columns {
    () => {
        "seq, id, items, description, price_cents, destination, status, create_time, update_time"
    };
}

/// A pooled connection idle this long is pinged before a call gets it (pgxpool's default).
const PING_IDLE_CONNECTIONS_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    acquire: Acquire,
}

impl PostgresStore {
    /// SearchOrders' query; `$1` is the `LIKE` pattern from [`contains_pattern`]. Both conditions
    /// match the expressions of the pg_trgm GIN indexes (migrations/postgres), so a selective query
    /// reads the few matching rows instead of every row. The items index covers all items joined by
    /// newlines; the `EXISTS` keeps a match within one item. lower() folds case by the database's
    /// LC_CTYPE: all of Unicode under a UTF-8 locale (what the official images and managed services
    /// default to), only ASCII under the plain C locale.
    pub const SEARCH_SQL: &str = concat!(
        "SELECT ",
        columns!(),
        " FROM orders",
        " WHERE lower(description) LIKE lower($1)",
        " OR (order_items_folded(items) LIKE lower($1)",
        " AND EXISTS (SELECT 1 FROM unnest(items) AS item WHERE lower(item) LIKE lower($1)))",
        " ORDER BY seq"
    );

    pub fn connect_lazy(
        settings: &DatabaseSettings,
        instruments: &StoreInstruments,
    ) -> Result<Self> {
        Ok(Self::with_options(
            PgConnectOptions::from_str(settings.url.expose())?,
            settings,
            instruments,
        ))
    }

    /// A store over connections made from `options`; tests use it to put each test in its own schema.
    pub fn with_options(
        options: PgConnectOptions,
        settings: &DatabaseSettings,
        instruments: &StoreInstruments,
    ) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.get())
            .acquire_timeout(settings.acquire_timeout)
            // sqlx pings a connection when it returns to the pool, so an idle connection was alive
            // when it was put back. Pinging it again on every acquire would add a round trip, and a
            // wake-up of its PostgreSQL backend, to every call; like pgxpool, the pool pings only
            // connections idle long enough to have been cut since (a restart, a failover, an idle
            // timeout on the way), and a connection that fails it is replaced, never handed out.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IDLE_CONNECTIONS_AFTER {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(options.application_name(env!("CARGO_PKG_NAME")));
        Self {
            pool,
            acquire: Acquire::new(instruments),
        }
    }
}

#[async_trait]
impl OrderStore for PostgresStore {
    async fn create(
        &self,
        details: &OrderDetails,
        request_id: Option<&RequestId>,
    ) -> Result<Order> {
        // One statement, no explicit transaction and no lock: inserts from every replica run in
        // parallel. ListOrders still never repeats an order nor skips one committed before its first
        // page (see `list`).
        let mut conn = super::connection(&self.pool, &self.acquire).await?;
        let inserted: Option<OrderRow> = sqlx::query_as(concat!(
            "INSERT INTO orders (id, request_id, items, description, price_cents, destination,",
            " status, create_time, update_time)",
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
            " ON CONFLICT (request_id) DO NOTHING",
            " RETURNING ",
            columns!()
        ))
        .bind(OrderId::generate().as_uuid())
        .bind(request_id.map(RequestId::as_str))
        .bind(details.items())
        .bind(details.description())
        .bind(details.price_cents())
        .bind(details.destination())
        .bind(OrderStatus::Pending.as_str())
        .bind(domain::now())
        .fetch_optional(&mut *conn)
        .await?;

        match (inserted, request_id) {
            (Some(row), _) => row.into_order(),
            // The key was used before. An insert that meets a key another transaction is still
            // inserting waits for that transaction to end, and does nothing only if it committed; so
            // the row is committed, and this next statement (a new snapshot) reads it.
            (None, Some(request_id)) => sqlx::query_as::<_, OrderRow>(concat!(
                "SELECT ",
                columns!(),
                " FROM orders WHERE request_id = $1"
            ))
            .bind(request_id.as_str())
            .fetch_one(&mut *conn)
            .await?
            .into_order(),
            (None, None) => Err(Error::CorruptData(
                "insert without a request id returned no row".to_owned(),
            )),
        }
    }

    async fn get(&self, id: OrderId) -> Result<Order> {
        let mut conn = super::connection(&self.pool, &self.acquire).await?;
        sqlx::query_as::<_, OrderRow>(concat!("SELECT ", columns!(), " FROM orders WHERE id = $1"))
            .bind(id.as_uuid())
            .fetch_optional(&mut *conn)
            .await?
            .ok_or(Error::OrderNotFound(id))?
            .into_order()
    }

    async fn list(&self, after: Option<PageCursor>, page_size: u32) -> Result<Page> {
        let mut conn = super::connection(&self.pool, &self.acquire).await?;
        // Keyset paging on `seq`, which never changes: no order is read twice, and an order committed
        // before the first page was read is in every page's snapshot, so none is skipped. `seq` is
        // drawn at insert, not at commit, so an order committed while paging may land behind the
        // cursor and not appear; the keyset guarantee allows that, and it keeps writes lock-free.
        // One row more than asked tells whether another page follows.
        let rows: Vec<OrderRow> = sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            " FROM orders WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after.map_or(0, PageCursor::position))
        .bind(i64::from(page_size) + 1)
        .fetch_all(&mut *conn)
        .await?;
        super::page_from_rows(rows, page_size, |row| row.seq, OrderRow::into_order)
    }

    fn search(&self, query: &str) -> OrderStream {
        let pool = self.pool.clone();
        let acquire = self.acquire.clone();
        let pattern = contains_pattern(query);
        Box::pin(async_stream::try_stream! {
            let mut conn = super::connection(&pool, &acquire).await?;
            let mut rows = sqlx::query_as::<_, OrderRow>(Self::SEARCH_SQL)
                .bind(pattern)
                .fetch(&mut *conn);
            while let Some(row) = rows.try_next().await? {
                yield row.into_order()?;
            }
        })
    }

    async fn update(&self, updates: &[OrderUpdate]) -> Result<()> {
        let mut tx = super::transaction(&self.pool, &self.acquire, "BEGIN").await?;
        let now = domain::now();
        for update in updates {
            let details = &update.details;
            let changed = sqlx::query(
                "UPDATE orders SET items = $1, description = $2, price_cents = $3, destination = $4, \
                 update_time = $5 WHERE id = $6 AND status = 'PENDING'",
            )
            .bind(details.items())
            .bind(details.description())
            .bind(details.price_cents())
            .bind(details.destination())
            .bind(now)
            .bind(update.id.as_uuid())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if changed == 0 {
                // Dropping `tx` rolls back everything this batch changed so far.
                return Err(not_pending(update.id, exists(&mut tx, update.id).await?));
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn ship(&self, ids: &[OrderId]) -> Result<Vec<Order>> {
        let mut tx = super::transaction(&self.pool, &self.acquire, "BEGIN").await?;
        let now = domain::now();
        let mut shipped = Vec::with_capacity(ids.len());
        for &id in ids {
            let row: Option<OrderRow> = sqlx::query_as(concat!(
                "UPDATE orders SET status = 'SHIPPED', update_time = $1",
                " WHERE id = $2 AND status = 'PENDING' RETURNING ",
                columns!()
            ))
            .bind(now)
            .bind(id.as_uuid())
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                Some(row) => shipped.push(row.into_order()?),
                None => return Err(not_pending(id, exists(&mut tx, id).await?)),
            }
        }
        tx.commit().await?;
        Ok(shipped)
    }

    async fn migrate(&self) -> Result<()> {
        // On the pool, not `super::connection`: sqlx's `Migrator::run` cannot take a pooled
        // connection inside an async-trait method, and migration errors never reach a client.
        Ok(MIGRATOR.run(&self.pool).await?)
    }

    async fn check_ready(&self) -> Result<()> {
        let mut conn = super::connection_for_check(&self.pool, &self.acquire).await?;
        ensure_schema_current(&mut *conn, &MIGRATOR).await
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    fn system(&self) -> &'static str {
        "postgresql"
    }

    fn pool_status(&self) -> PoolStatus {
        super::pool_status(&self.pool)
    }
}

/// A `LIKE` pattern matching text that contains `query` as it is: `%`, `_` and the escape character
/// `\` in it match only themselves.
fn contains_pattern(query: &str) -> String {
    let mut pattern = String::with_capacity(query.len() + 2);
    pattern.push('%');
    for c in query.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

async fn exists(conn: &mut PgConnection, id: OrderId) -> Result<bool> {
    Ok(sqlx::query("SELECT 1 FROM orders WHERE id = $1")
        .bind(id.as_uuid())
        .fetch_optional(conn)
        .await?
        .is_some())
}

#[cfg(test)]
mod tests {
    #[test]
    fn search_patterns_match_like_wildcards_literally() {
        assert_eq!(super::contains_pattern("Widget"), "%Widget%");
        assert_eq!(super::contains_pattern(r"50%_off\\"), r"%50\%\_off\\\\%");
    }
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    seq: i64,
    id: Uuid,
    items: Vec<String>,
    description: String,
    price_cents: i64,
    destination: String,
    status: String,
    create_time: DateTime<Utc>,
    update_time: DateTime<Utc>,
}

impl OrderRow {
    fn into_order(self) -> Result<Order> {
        let id = OrderId::from(self.id);
        let status = OrderStatus::from_storage(&self.status)
            .ok_or_else(|| Error::CorruptData(format!("status {:?} of order {id}", self.status)))?;
        Ok(Order {
            id,
            details: OrderDetails::from_storage(
                self.items,
                self.description,
                self.price_cents,
                self.destination,
            ),
            status,
            create_time: self.create_time,
            update_time: self.update_time,
        })
    }
}
