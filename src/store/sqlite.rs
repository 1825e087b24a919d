//! The embedded SQLite store: a file in the working directory (or memory, for tests), nothing to install.

use std::{str::FromStr, sync::LazyLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use platform::telemetry::metrics::StoreInstruments;
use sqlx::{
    SqliteConnection, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

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
    LazyLock::new(|| super::tolerating_newer_schemas(sqlx::migrate!("migrations/sqlite")));

/// The columns every query returns, in the order `OrderRow` reads them.
macro_rules! columns {
    () => {
        "seq, id, items, description, price_cents, destination, status, create_time, update_time"
    };
}

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    acquire: Acquire,
}

impl SqliteStore {
    pub fn connect_lazy(
        settings: &DatabaseSettings,
        instruments: &StoreInstruments,
    ) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(settings.url.expose())?
            .create_if_missing(true)
            // WAL lets readers run while one writer commits; NORMAL is durable with WAL.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(settings.acquire_timeout)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(settings.max_connections.get())
            .acquire_timeout(settings.acquire_timeout)
            // An embedded database has no connection to lose. sqlx runs each SQLite connection on a
            // thread of its own, so the default ping on acquire would cost every call one more
            // hand-off to that thread and back (sqlx still pings once when a connection returns).
            .test_before_acquire(false)
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            acquire: Acquire::new(instruments),
        })
    }

    /// Starts a transaction that holds the write lock from its first statement. A deferred
    /// transaction that reads first fails with SQLITE_BUSY instead of waiting when another writer got
    /// in between; taking the lock up front makes writers queue behind each other.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        super::transaction(&self.pool, &self.acquire, "BEGIN IMMEDIATE").await
    }
}

#[async_trait]
impl OrderStore for SqliteStore {
    async fn create(
        &self,
        details: &OrderDetails,
        request_id: Option<&RequestId>,
    ) -> Result<Order> {
        let now = domain::now();
        let mut conn = super::connection(&self.pool, &self.acquire).await?;
        let inserted: Option<OrderRow> = sqlx::query_as(concat!(
            "INSERT INTO orders (id, request_id, items, description, price_cents, destination,",
            " status, create_time, update_time, items_folded, description_folded)",
            " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10)",
            " ON CONFLICT (request_id) DO NOTHING",
            " RETURNING ",
            columns!()
        ))
        .bind(OrderId::generate().to_string())
        .bind(request_id.map(RequestId::as_str))
        .bind(items_json(details.items())?)
        .bind(details.description())
        .bind(details.price_cents())
        .bind(details.destination())
        .bind(OrderStatus::Pending.as_str())
        .bind(now)
        .bind(items_json(&fold_items(details.items()))?)
        .bind(details.description().to_lowercase())
        .fetch_optional(&mut *conn)
        .await?;

        match (inserted, request_id) {
            (Some(row), _) => row.into_order(),
            // The key was used before: return what that request created. Its row is committed, since
            // SQLite lets one writer at a time in and the conflicting insert ran after it.
            (None, Some(request_id)) => sqlx::query_as::<_, OrderRow>(concat!(
                "SELECT ",
                columns!(),
                " FROM orders WHERE request_id = ?1"
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
        sqlx::query_as::<_, OrderRow>(concat!("SELECT ", columns!(), " FROM orders WHERE id = ?1"))
            .bind(id.to_string())
            .fetch_optional(&mut *conn)
            .await?
            .ok_or(Error::OrderNotFound(id))?
            .into_order()
    }

    async fn list(&self, after: Option<PageCursor>, page_size: u32) -> Result<Page> {
        let mut conn = super::connection(&self.pool, &self.acquire).await?;
        // One row more than asked tells whether another page follows.
        let rows: Vec<OrderRow> = sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            " FROM orders WHERE seq > ?1 ORDER BY seq LIMIT ?2"
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
        let folded_query = query.to_lowercase();
        Box::pin(async_stream::try_stream! {
            let mut conn = super::connection(&pool, &acquire).await?;
            let mut rows = sqlx::query_as::<_, OrderRow>(concat!(
                "SELECT ", columns!(), " FROM orders",
                " WHERE instr(description_folded, ?1) > 0",
                " OR EXISTS (SELECT 1 FROM json_each(orders.items_folded) AS item",
                "            WHERE instr(item.value, ?1) > 0)",
                " ORDER BY seq"
            ))
            .bind(folded_query)
            .fetch(&mut *conn);
            while let Some(row) = rows.try_next().await? {
                yield row.into_order()?;
            }
        })
    }

    async fn update(&self, updates: &[OrderUpdate]) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let now = domain::now();
        for update in updates {
            let details = &update.details;
            let changed = sqlx::query(
                "UPDATE orders SET items = ?1, description = ?2, price_cents = ?3, destination = ?4, \
                 update_time = ?5, items_folded = ?6, description_folded = ?7 \
                 WHERE id = ?8 AND status = 'PENDING'",
            )
            .bind(items_json(details.items())?)
            .bind(details.description())
            .bind(details.price_cents())
            .bind(details.destination())
            .bind(now)
            .bind(items_json(&fold_items(details.items()))?)
            .bind(details.description().to_lowercase())
            .bind(update.id.to_string())
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
        let mut tx = self.begin_write().await?;
        let now = domain::now();
        let mut shipped = Vec::with_capacity(ids.len());
        for &id in ids {
            let row: Option<OrderRow> = sqlx::query_as(concat!(
                "UPDATE orders SET status = 'SHIPPED', update_time = ?1",
                " WHERE id = ?2 AND status = 'PENDING' RETURNING ",
                columns!()
            ))
            .bind(now)
            .bind(id.to_string())
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
        "sqlite"
    }

    fn pool_status(&self) -> PoolStatus {
        super::pool_status(&self.pool)
    }
}

async fn exists(conn: &mut SqliteConnection, id: OrderId) -> Result<bool> {
    Ok(sqlx::query("SELECT 1 FROM orders WHERE id = ?1")
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?
        .is_some())
}

fn items_json(items: &[String]) -> Result<String> {
    serde_json::to_string(items).map_err(|err| Error::CorruptData(err.to_string()))
}

fn fold_items(items: &[String]) -> Vec<String> {
    items.iter().map(|item| item.to_lowercase()).collect()
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    seq: i64,
    id: String,
    items: String,
    description: String,
    price_cents: i64,
    destination: String,
    status: String,
    create_time: DateTime<Utc>,
    update_time: DateTime<Utc>,
}

impl OrderRow {
    fn into_order(self) -> Result<Order> {
        let id = OrderId::parse(&self.id).map_err(Error::CorruptData)?;
        let items: Vec<String> = serde_json::from_str(&self.items)
            .map_err(|err| Error::CorruptData(format!("items of order {id}: {err}")))?;
        let status = OrderStatus::from_storage(&self.status)
            .ok_or_else(|| Error::CorruptData(format!("status {:?} of order {id}", self.status)))?;
        Ok(Order {
            id,
            details: OrderDetails::from_storage(
                items,
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
