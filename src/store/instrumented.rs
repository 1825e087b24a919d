//! Every store operation as an OpenTelemetry CLIENT span (a child of the call's span) and a sample
//! of `db_client_operation_duration_seconds`, for any backend: one decorator instead of the same
//! lines in each method of each store.
//!
//! Spans carry the database conventions' `db.system`, `db.operation` and `db.collection.name`, never
//! the statement's bound values (order contents are customer data).

use std::{sync::Arc, task::Poll, time::Instant};

use async_trait::async_trait;
use futures::StreamExt;
use prometheus::Histogram;
use tracing::{Instrument, Span};

use platform::telemetry::{
    self,
    metrics::{MetricsError, PoolStatus, StoreInstruments},
};

use super::{OrderStore, OrderStream, Page, PageCursor};
use crate::{
    domain::{Order, OrderDetails, OrderId, OrderUpdate, RequestId},
    error::{Error, Result},
};

/// The one table the store works on.
const COLLECTION: &str = "orders";

/// The kinds of operation, each with its span name and its duration histogram.
struct Operation {
    /// `db.operation`
    name: &'static str,
    /// The span name, `<operation> <collection>`, as the conventions form it.
    span_name: &'static str,
    duration: Histogram,
}

impl Operation {
    fn new(
        instruments: &StoreInstruments,
        system: &str,
        name: &'static str,
        span_name: &'static str,
    ) -> Result<Self, MetricsError> {
        Ok(Self {
            name,
            span_name,
            duration: instruments.operation(system, name, COLLECTION)?,
        })
    }
}

pub struct Instrumented {
    inner: Arc<dyn OrderStore>,
    select: Operation,
    insert: Operation,
    update: Operation,
}

impl Instrumented {
    pub fn new(
        inner: Arc<dyn OrderStore>,
        instruments: &StoreInstruments,
    ) -> Result<Self, MetricsError> {
        let system = inner.system();
        Ok(Self {
            select: Operation::new(instruments, system, "SELECT", "SELECT orders")?,
            insert: Operation::new(instruments, system, "INSERT", "INSERT orders")?,
            update: Operation::new(instruments, system, "UPDATE", "UPDATE orders")?,
            inner,
        })
    }

    /// The operation's CLIENT span, inside a sampled call; none elsewhere (an unsampled call, a
    /// background check), where it would start a trace of its own.
    fn span(&self, operation: &Operation) -> Span {
        if !telemetry::in_sampled_call() {
            return Span::none();
        }
        tracing::info_span!(
            "db",
            otel.name = operation.span_name,
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            db.system = self.inner.system(),
            db.operation = operation.name,
            db.collection.name = COLLECTION,
        )
    }

    /// Runs `work` in `operation`'s span and records its duration and outcome.
    async fn observe<T>(
        &self,
        operation: &Operation,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let span = self.span(operation);
        let started = Instant::now();
        let result = work.instrument(span.clone()).await;
        operation.duration.observe(started.elapsed().as_secs_f64());
        if let Err(err) = &result {
            record_failure(&span, err);
        }
        result
    }
}

/// Marks `span` failed when `err` is the database's fault; a missing or shipped order is an answer,
/// not a failed operation.
fn record_failure(span: &Span, err: &Error) {
    if matches!(
        err,
        Error::Unavailable(_)
            | Error::Database(_)
            | Error::Migration(_)
            | Error::SchemaBehind(_)
            | Error::CorruptData(_)
    ) {
        span.record("otel.status_code", "ERROR");
    }
}

#[async_trait]
impl OrderStore for Instrumented {
    async fn create(
        &self,
        details: &OrderDetails,
        request_id: Option<&RequestId>,
    ) -> Result<Order> {
        self.observe(&self.insert, self.inner.create(details, request_id))
            .await
    }

    async fn get(&self, id: OrderId) -> Result<Order> {
        self.observe(&self.select, self.inner.get(id)).await
    }

    async fn list(&self, after: Option<PageCursor>, page_size: u32) -> Result<Page> {
        self.observe(&self.select, self.inner.list(after, page_size))
            .await
    }

    /// The span and the duration cover the whole stream, until its last row or until it is dropped.
    fn search(&self, query: &str) -> OrderStream {
        let mut rows = self.inner.search(query);
        let search = FinishSearch {
            span: self.span(&self.select),
            duration: self.select.duration.clone(),
            started: Instant::now(),
        };
        Box::pin(futures::stream::poll_fn(move |cx| {
            let _in_span = search.span.enter();
            let row = rows.poll_next_unpin(cx);
            if let Poll::Ready(Some(Err(err))) = &row {
                record_failure(&search.span, err);
            }
            row
        }))
    }

    async fn update(&self, updates: &[OrderUpdate]) -> Result<()> {
        self.observe(&self.update, self.inner.update(updates)).await
    }

    async fn ship(&self, ids: &[OrderId]) -> Result<Vec<Order>> {
        self.observe(&self.update, self.inner.ship(ids)).await
    }

    // Migrations, readiness probes and closing are the server's own housekeeping, not work done
    // for a call: they get neither spans nor operation samples.
    async fn migrate(&self) -> Result<()> {
        self.inner.migrate().await
    }

    async fn check_ready(&self) -> Result<()> {
        self.inner.check_ready().await
    }

    async fn close(&self) {
        self.inner.close().await;
    }

    fn system(&self) -> &'static str {
        self.inner.system()
    }

    fn pool_status(&self) -> PoolStatus {
        self.inner.pool_status()
    }
}

/// Records a search's duration when its stream is dropped, after the last row or abandoned.
struct FinishSearch {
    span: Span,
    duration: Histogram,
    started: Instant,
}

impl Drop for FinishSearch {
    fn drop(&mut self) {
        self.duration.observe(self.started.elapsed().as_secs_f64());
    }
}
