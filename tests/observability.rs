//! Metrics as a scrape sees them: every call counted once, by kind and code, with its messages; label
//! values bounded however many unknown paths are called; database and build metrics present; and the
//! shipped dashboard and alert rules naming only metrics the service exports.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use app::{
    api::ORDER_SERVICE_NAME,
    api::{self, ProcessOrdersRequest, SearchOrdersRequest, UpdateOrdersRequest},
};
use common::{Backend, TestApp, order_to};
use futures::stream;
use platform::telemetry::metrics::{Metrics, go_code_name};

/// The samples of a scrape, by series (name and labels, as rendered).
fn scrape(metrics: &Metrics) -> BTreeMap<String, f64> {
    let text = String::from_utf8(metrics.render().expect("render")).expect("UTF-8");
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// How much `series` moved between two scrapes.
fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    let value = |scrape: &BTreeMap<String, f64>| scrape.get(series).copied().unwrap_or(0.0);
    value(after) - value(before)
}

/// A series of `name` for one API method, labels in the order the encoder writes them (by name).
fn api_series(name: &str, kind: &str, method: &str, code: Option<&str>) -> String {
    let code = code
        .map(|code| format!("grpc_code=\"{code}\","))
        .unwrap_or_default();
    series(
        name,
        &format!(
            "{code}grpc_method=\"{method}\",grpc_service=\"{ORDER_SERVICE_NAME}\",grpc_type=\"{kind}\""
        ),
    )
}

/// `name{labels}`, built without doubled-brace escapes, which the template check would take for Liquid.
fn series(name: &str, labels: &str) -> String {
    [name, "{", labels, "}"].concat()
}

fn metrics_of(app: &TestApp) -> &Metrics {
    app.metrics.as_deref().expect("metrics are on by default")
}

backend_tests!(
    every_call_is_counted_once_by_kind_and_code_with_its_messages,
    database_pool_and_build_metrics_are_exported,
);

async fn every_call_is_counted_once_by_kind_and_code_with_its_messages(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let orders: Vec<api::Order> = {
        let mut created = Vec::new();
        for destination in ["Oslo", "Lima", "Pune"] {
            created.push(app.create_for(destination).await);
        }
        created
    };
    let before = scrape(metrics_of(&app));
    let mut client = app.orders.clone();

    // Unary: two OK, one NotFound, one InvalidArgument.
    for order in &orders[..2] {
        app.get(&order.id).await.expect("found");
    }
    app.get(&uuid::Uuid::new_v4().to_string())
        .await
        .expect_err("not found");
    app.get("not-an-id").await.expect_err("invalid");
    // Client stream: three messages in, one out.
    let updates = orders.iter().map(|order| UpdateOrdersRequest {
        order: Some(api::Order {
            destination: "Quito".to_owned(),
            ..order.clone()
        }),
    });
    client
        .update_orders(stream::iter(updates.collect::<Vec<_>>()))
        .await
        .expect("updated");
    // Server stream: one message in, three out.
    let mut found = client
        .search_orders(SearchOrdersRequest {
            query: order_to("x").items[0].clone(),
        })
        .await
        .expect("search starts")
        .into_inner();
    let mut results = 0;
    while found.message().await.expect("search continues").is_some() {
        results += 1;
    }
    assert_eq!(results, 3);
    // Bidi stream: three messages in, one shipment of three out.
    let shipments = client
        .process_orders(stream::iter(
            orders
                .iter()
                .map(|order| ProcessOrdersRequest {
                    order_id: order.id.clone(),
                })
                .collect::<Vec<_>>(),
        ))
        .await
        .expect("processing starts")
        .into_inner();
    let shipments: Vec<_> = futures::StreamExt::collect::<Vec<_>>(shipments).await;
    assert_eq!(shipments.len(), 1, "{shipments:?}");

    // A failed call of each streaming kind that takes requests, after one message in.
    let invalid_update = client
        .update_orders(stream::iter(vec![UpdateOrdersRequest {
            order: Some(api::Order {
                id: "not-an-id".to_owned(),
                ..order_to("Quito")
            }),
        }]))
        .await
        .expect_err("an invalid id");
    let mut invalid_shipments = client
        .process_orders(stream::iter(vec![ProcessOrdersRequest {
            order_id: "not-an-id".to_owned(),
        }]))
        .await
        .expect("processing starts")
        .into_inner();
    let invalid_process = loop {
        match invalid_shipments.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("an invalid id must fail the stream"),
            Err(status) => break status,
        }
    };

    let after = scrape(metrics_of(&app));
    let moved = |name: &str, kind: &str, method: &str, code: Option<&str>| {
        delta(&before, &after, &api_series(name, kind, method, code))
    };
    let handled = "grpc_server_handled_total";
    assert_eq!(
        moved("grpc_server_started_total", "unary", "GetOrder", None),
        4.0
    );
    assert_eq!(moved(handled, "unary", "GetOrder", Some("OK")), 2.0);
    assert_eq!(moved(handled, "unary", "GetOrder", Some("NotFound")), 1.0);
    assert_eq!(
        moved(handled, "unary", "GetOrder", Some("InvalidArgument")),
        1.0
    );
    assert_eq!(moved(handled, "unary", "GetOrder", Some("Internal")), 0.0);
    assert_eq!(
        moved(
            "grpc_server_handling_seconds_count",
            "unary",
            "GetOrder",
            None
        ),
        4.0
    );
    assert_eq!(
        moved("grpc_server_msg_received_total", "unary", "GetOrder", None),
        4.0
    );
    // Errors are trailers-only: no message goes out.
    assert_eq!(
        moved("grpc_server_msg_sent_total", "unary", "GetOrder", None),
        2.0
    );

    // Started: the good call and, for two of them, the failed one; messages of both.
    for (kind, method, started, received, sent) in [
        ("client_stream", "UpdateOrders", 2.0, 4.0, 1.0),
        ("server_stream", "SearchOrders", 1.0, 1.0, 3.0),
        ("bidi_stream", "ProcessOrders", 2.0, 4.0, 1.0),
    ] {
        assert_eq!(
            moved("grpc_server_started_total", kind, method, None),
            started,
            "{method}"
        );
        assert_eq!(moved(handled, kind, method, Some("OK")), 1.0, "{method}");
        assert_eq!(
            moved("grpc_server_msg_received_total", kind, method, None),
            received,
            "{method}"
        );
        assert_eq!(
            moved("grpc_server_msg_sent_total", kind, method, None),
            sent,
            "{method}"
        );
    }
    for (kind, method, status) in [
        ("client_stream", "UpdateOrders", &invalid_update),
        ("bidi_stream", "ProcessOrders", &invalid_process),
    ] {
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{method}: {status:?}"
        );
        let code = go_code_name(status.code());
        assert_eq!(moved(handled, kind, method, Some(code)), 1.0, "{method}");
    }
    // Nothing else in the API moved, and nothing is left in flight.
    let api_handled: f64 = after
        .iter()
        .filter(|(series, _)| series.starts_with(handled) && series.contains(ORDER_SERVICE_NAME))
        .map(|(series, _)| delta(&before, &after, series))
        .sum();
    assert_eq!(api_handled, 9.0);
    for (series, value) in &after {
        if series.starts_with("grpc_server_in_flight_rpcs") && series.contains(ORDER_SERVICE_NAME) {
            assert_eq!(*value, 0.0, "{series}");
        }
    }
}

async fn database_pool_and_build_metrics_are_exported(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let order = app.create_for("Oslo").await;
    app.get(&order.id).await.expect("found");
    let samples = scrape(metrics_of(&app));
    let system = match backend {
        Backend::Sqlite => "sqlite",
        #[cfg(feature = "postgres")]
        Backend::Postgres => "postgresql",
    };
    for operation in ["INSERT", "SELECT"] {
        let series = series(
            "db_client_operation_duration_seconds_count",
            &format!(
                "db_collection_name=\"orders\",db_operation=\"{operation}\",db_system=\"{system}\""
            ),
        );
        assert!(
            samples.get(&series).is_some_and(|count| *count >= 1.0),
            "{series}"
        );
    }
    assert!(samples["db_client_connections_wait_time_seconds_count"] >= 2.0);
    assert_eq!(
        samples["db_client_connections_max"], 5.0,
        "test_settings' pool"
    );
    let used = samples[r#"db_client_connections_usage{state="used"}"#];
    let idle = samples[r#"db_client_connections_usage{state="idle"}"#];
    assert!(
        used + idle >= 1.0 && used + idle <= 5.0,
        "{used} used, {idle} idle"
    );
    let build_info = samples
        .iter()
        .find(|(series, _)| series.contains("_build_info{"))
        .expect("build info");
    assert!(
        build_info.0.starts_with(&format!(
            "{}_build_info",
            env!("CARGO_PKG_NAME").replace('-', "_")
        )),
        "{build_info:?}"
    );
    assert!(
        build_info
            .0
            .contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(*build_info.1, 1.0);
    #[cfg(target_os = "linux")]
    for process in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(samples.contains_key(process), "{process}");
    }
}

#[tokio::test]
async fn a_thousand_unknown_paths_add_no_series() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite");
    let before = scrape(metrics_of(&app));
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    for _ in 0..1000 {
        grpc.ready().await.expect("ready");
        let path = format!("/random.{}/Method", uuid::Uuid::new_v4().simple());
        let status = grpc
            .unary::<(), (), _>(
                tonic::Request::new(()),
                path.parse().expect("path"),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .expect_err("nobody serves it");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }
    let after = scrape(metrics_of(&app));
    let names = |scrape: &BTreeMap<String, f64>| scrape.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(names(&before), names(&after), "no series came or went");
    let unknown = r#"grpc_server_handled_total{grpc_code="Unimplemented",grpc_method="unknown",grpc_service="unknown",grpc_type="unary"}"#;
    assert_eq!(delta(&before, &after, unknown), 1000.0);
}

#[tokio::test]
async fn with_metrics_off_there_is_no_registry_and_calls_are_served() {
    let app = TestApp::spawn_with(Backend::Sqlite, |settings| {
        settings.platform.server.metrics_addr = None;
    })
    .await
    .expect("SQLite");
    assert!(app.metrics.is_none());
    app.create_for("Oslo").await;
}

/// Every metric name a PromQL expression in `text` uses: identifiers followed by `{`, `[` or used
/// bare, which are not PromQL functions, keywords or label names.
fn metric_names(expression: &str) -> BTreeSet<String> {
    // Label matchers, strings and range durations carry no metric names: blank them out.
    let mut cleaned = String::with_capacity(expression.len());
    let (mut depth, mut in_string) = (0_i32, false);
    for c in expression.chars() {
        let hidden = in_string || depth > 0;
        match c {
            '"' => in_string = !in_string,
            '{' | '[' if !in_string => depth += 1,
            '}' | ']' if !in_string => depth -= 1,
            _ => {}
        }
        let bracket = matches!(c, '"' | '{' | '[' | '}' | ']');
        cleaned.push(if hidden || bracket { ' ' } else { c });
    }
    // Grouping clauses (by/without/on/ignoring/group_left/group_right (...)) name labels.
    let grouping = grouping_labels(&cleaned);
    cleaned
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with(|c: char| c.is_ascii_lowercase()))
        .filter(|word| word.contains('_') || *word == "up")
        .filter(|word| !grouping.contains(*word))
        .filter(|word| !PROMQL_WORDS.contains(word))
        .map(str::to_owned)
        .collect()
}

/// Words inside the parentheses after a grouping keyword.
fn grouping_labels(expression: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for keyword in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        let mut rest = expression;
        while let Some(at) = rest.find(keyword) {
            let after = &rest[at + keyword.len()..];
            let boundary_before = rest[..at]
                .chars()
                .last()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
            if boundary_before
                && let Some(open) = after.trim_start().strip_prefix('(')
                && let Some(close) = open.find(')')
            {
                labels.extend(
                    open[..close]
                        .split(',')
                        .map(|label| label.trim().to_owned()),
                );
            }
            rest = after;
        }
    }
    labels
}

const PROMQL_WORDS: &[&str] = &[
    "histogram_quantile",
    "label_replace",
    "label_join",
    "count_values",
    "bottomk",
    "topk",
    "quantile_over_time",
    "avg_over_time",
    "max_over_time",
    "min_over_time",
    "sum_over_time",
    "count_over_time",
    "last_over_time",
    "group_left",
    "group_right",
    "absent_over_time",
    "predict_linear",
    "clamp_min",
    "clamp_max",
    "label_values",
];

/// Every series name the service can export: its families, with a histogram's `_bucket`, `_sum`
/// and `_count`.
async fn exported_names() -> BTreeSet<String> {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite");
    let text = String::from_utf8(metrics_of(&app).render().expect("render")).expect("UTF-8");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .chain(["up".to_owned()]) // Prometheus's own, per scrape target.
        .collect()
}

fn deploy_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/observability")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn assert_known(expressions: &[String], exported: &BTreeSet<String>, file: &str) {
    assert!(!expressions.is_empty(), "{file} has no expressions");
    for expression in expressions {
        let names = metric_names(expression);
        assert!(!names.is_empty(), "{file}: no metric in {expression}");
        for name in names {
            assert!(
                exported.contains(&name),
                "{file}: {name} (in {expression}) is not exported"
            );
        }
    }
}

#[tokio::test]
async fn the_dashboard_and_alerts_name_only_exported_metrics() {
    let exported = exported_names().await;

    let dashboard: serde_json::Value =
        serde_json::from_str(&deploy_file("grafana-dashboard.json")).expect("dashboard is JSON");
    let mut expressions = Vec::new();
    collect_exprs(&dashboard, &mut expressions);
    assert_known(&expressions, &exported, "grafana-dashboard.json");
    // Template variables: `label_values(metric, label)` names a metric too.
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("template variables");
    let mut queried = Vec::new();
    for variable in variables {
        let query = match &variable["query"] {
            serde_json::Value::String(query) => query.clone(),
            serde_json::Value::Object(query) => query
                .get("query")
                .and_then(|query| query.as_str())
                .unwrap_or_default()
                .to_owned(),
            _ => String::new(),
        };
        if let Some(arguments) = query.strip_prefix("label_values(") {
            let metric = arguments
                .split([',', ')'])
                .next()
                .unwrap_or_default()
                .trim();
            queried.push(metric.to_owned());
        }
    }
    assert!(!queried.is_empty(), "no label_values variable");
    assert_known(&queried, &exported, "grafana-dashboard.json variables");

    // One `expr:` per rule; a block scalar (`expr: |`) continues on the lines indented under it.
    let rules = deploy_file("alerts.yaml");
    let mut expressions = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some((indent, value)) = line.split_once("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') || value.is_empty() {
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                if next.trim().is_empty() || next.len() - next.trim_start().len() > indent.len() {
                    block.push_str(next.trim());
                    block.push(' ');
                    lines.next();
                } else {
                    break;
                }
            }
            expressions.push(block);
        } else {
            expressions.push(value.trim_matches(['\'', '"']).to_owned());
        }
    }
    assert_known(&expressions, &exported, "alerts.yaml");
}

/// Every `expr` string (panel targets) in a dashboard.
fn collect_exprs(value: &serde_json::Value, found: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) if !expr.is_empty() => {
                        found.push(expr.clone());
                    }
                    _ => collect_exprs(value, found),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                collect_exprs(item, found);
            }
        }
        _ => {}
    }
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        r#"sum by (grpc_service, grpc_method) (rate(grpc_server_handled_total{grpc_code!="OK",job="x"}[5m])) / on (job) group_left sum(rate(grpc_server_started_total[$__rate_interval]))"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["grpc_server_handled_total", "grpc_server_started_total"]
    );
}
