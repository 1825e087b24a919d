//! The report: counts, rate, latency percentiles and the status and error distributions, as ghz
//! prints them, in summary or JSON form.

use super::*;

/// Latencies and outcomes, per call of the plan and (merged) for the run.
pub(crate) struct Report {
    pub(crate) duration: Duration,
    pub(crate) per_call: Vec<CallReport>,
}

pub(crate) struct CallReport {
    pub(crate) name: Arc<str>,
    /// Microseconds, 1 µs to 1 h at 3 significant digits.
    pub(crate) latencies: Histogram<u64>,
    pub(crate) codes: HashMap<Code, u64>,
    pub(crate) errors: HashMap<String, u64>,
}

impl CallReport {
    pub(crate) fn new(name: Arc<str>) -> Self {
        Self {
            name,
            // The bounds are constants that `new_with_bounds` accepts.
            latencies: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .unwrap_or_else(|_| unreachable!("valid histogram bounds")),
            codes: HashMap::new(),
            errors: HashMap::new(),
        }
    }

    pub(crate) fn merge(&mut self, other: CallReport) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latencies.add(&other.latencies);
        for (code, count) in other.codes {
            *self.codes.entry(code).or_default() += count;
        }
        for (message, count) in other.errors {
            *self.errors.entry(message).or_default() += count;
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.codes.values().sum()
    }

    pub(crate) fn ok(&self) -> u64 {
        self.codes.get(&Code::Ok).copied().unwrap_or(0)
    }
}

impl Report {
    pub(crate) fn new(calls: &[CallPlan]) -> Self {
        Self {
            duration: Duration::ZERO,
            per_call: calls
                .iter()
                .map(|call| CallReport::new(call.name.clone()))
                .collect(),
        }
    }

    pub(crate) fn record(&mut self, index: usize, latency: Duration, outcome: Result<(), Status>) {
        let call = &mut self.per_call[index];
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        call.latencies.saturating_record(micros.max(1));
        let code = match outcome {
            Ok(()) => Code::Ok,
            Err(status) => {
                *call
                    .errors
                    .entry(format!("{:?}: {}", status.code(), status.message()))
                    .or_default() += 1;
                status.code()
            }
        };
        *call.codes.entry(code).or_default() += 1;
    }

    pub(crate) fn merge(&mut self, other: Report) {
        for (mine, theirs) in self.per_call.iter_mut().zip(other.per_call) {
            mine.merge(theirs);
        }
    }

    pub(crate) fn overall(&self) -> CallReport {
        let mut all = CallReport::new("all".into());
        for call in &self.per_call {
            all.merge(CallReport {
                name: call.name.clone(),
                latencies: call.latencies.clone(),
                codes: call.codes.clone(),
                errors: call.errors.clone(),
            });
        }
        all
    }

    pub(crate) fn summary(&self) -> String {
        let all = self.overall();
        let seconds = self.duration.as_secs_f64();
        let ms = |micros: u64| micros as f64 / 1000.0;
        let mut out = String::new();
        let _ = writeln!(out, "Summary:");
        let _ = writeln!(out, "  Count:\t{}", all.count());
        let _ = writeln!(out, "  OK:\t\t{}", all.ok());
        let _ = writeln!(out, "  Total:\t{seconds:.2} s");
        let _ = writeln!(out, "  Slowest:\t{:.2} ms", ms(all.latencies.max()));
        let _ = writeln!(out, "  Fastest:\t{:.2} ms", ms(all.latencies.min()));
        let _ = writeln!(out, "  Average:\t{:.2} ms", all.latencies.mean() / 1000.0);
        let _ = writeln!(out, "  Requests/sec:\t{:.2}", all.count() as f64 / seconds);
        let _ = writeln!(out, "\nLatency distribution:");
        for percentile in [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0] {
            let _ = writeln!(
                out,
                "  {percentile:.0} % in {:.2} ms",
                ms(all.latencies.value_at_percentile(percentile))
            );
        }
        if self.per_call.len() > 1 {
            let _ = writeln!(out, "\nPer call:");
            for call in &self.per_call {
                let _ = writeln!(
                    out,
                    "  {}: {} calls, {} OK, p50 {:.2} ms, p99 {:.2} ms",
                    call.name,
                    call.count(),
                    call.ok(),
                    ms(call.latencies.value_at_percentile(50.0)),
                    ms(call.latencies.value_at_percentile(99.0)),
                );
            }
        }
        let _ = writeln!(out, "\nStatus code distribution:");
        for (code, count) in sorted(&all.codes, |code| format!("{code:?}")) {
            let _ = writeln!(out, "  [{code}]\t{count} responses");
        }
        if !all.errors.is_empty() {
            let _ = writeln!(out, "\nError distribution:");
            for (message, count) in sorted(&all.errors, Clone::clone).into_iter().take(20) {
                let _ = writeln!(out, "  [{count}]\t{message}");
            }
        }
        out
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        let seconds = self.duration.as_secs_f64();
        let describe = |call: &CallReport| {
            let latencies = &call.latencies;
            let percentile = |p: f64| latencies.value_at_percentile(p);
            serde_json::json!({
                "count": call.count(),
                "ok": call.ok(),
                "rps": call.count() as f64 / seconds,
                "latency_us": {
                    "min": latencies.min(),
                    "mean": latencies.mean(),
                    "p50": percentile(50.0),
                    "p90": percentile(90.0),
                    "p95": percentile(95.0),
                    "p99": percentile(99.0),
                    "max": latencies.max(),
                },
                "status_codes": sorted(&call.codes, |code| format!("{code:?}")).into_iter().collect::<BTreeMap<_, _>>(),
                "errors": call.errors.iter().map(|(m, c)| (m.clone(), *c)).collect::<BTreeMap<_, _>>(),
            })
        };
        let mut json = describe(&self.overall());
        json["duration_s"] = seconds.into();
        json["calls"] = self
            .per_call
            .iter()
            .map(|call| (call.name.to_string(), describe(call)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        json
    }
}

/// Entries by count, most first, named by `name`.
pub(crate) fn sorted<K>(
    counts: &HashMap<K, u64>,
    name: impl Fn(&K) -> String,
) -> Vec<(String, u64)> {
    let mut entries: Vec<(String, u64)> = counts.iter().map(|(k, v)| (name(k), *v)).collect();
    entries.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    entries
}
