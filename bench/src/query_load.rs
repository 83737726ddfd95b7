//! `--workload query`: sessions on the client library, each asking one query at a time,
//! `field = v` over every benchmark key for a random `v`, where `field` is one of the
//! fields `--fields` writes (`p10000`, `p100`, `p10`: 0.01%, 1% and 10% of the keys match).
//! Whether an index answers it or a scan of the prefix is set up before the window
//! (`--query-access`); the plan every core reports is checked against it, and every answer's
//! count against the keys the value must match.

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tessera_client::{Client, QueryOptions};
use tessera_protocol::query::QueryNode;
use tessera_protocol::{FieldValue, Query, QueryAccess};

use crate::report::Recorder;
use crate::workload::{Op, FIELD_MODULI, KEY_PREFIX};

/// How the window's queries are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueryAccessMode {
    /// Through an equality index on the field, built before the window.
    Index,
    /// By a scan of the prefix (no index on the field).
    Scan,
}

/// One window's queries.
#[derive(Debug, Clone)]
pub struct QueryPlanSpec {
    /// The field compared.
    pub field: &'static str,
    /// Its values: the key's index modulo this.
    pub modulus: u64,
    /// Keys written (indexes `0..key_count`).
    pub key_count: u64,
    /// Ask for counts only (every match is found and counted), or a page of `limit`.
    pub count_only: bool,
    /// Items per page when not counting.
    pub limit: u32,
    /// What answers it.
    pub access: QueryAccessMode,
}

impl QueryPlanSpec {
    /// The plan for `field`, which must be one of [`FIELD_MODULI`].
    ///
    /// # Errors
    /// `field` is not one the benchmark writes.
    pub fn new(
        field: &str,
        key_count: u64,
        count_only: bool,
        limit: u32,
        access: QueryAccessMode,
    ) -> Result<Self, String> {
        let (field, modulus) = FIELD_MODULI
            .iter()
            .find(|(name, _)| *name == field)
            .copied()
            .ok_or_else(|| format!("--query-field {field:?}: expected one of p10000, p100, p10"))?;
        Ok(Self {
            field,
            modulus,
            key_count,
            count_only,
            limit,
            access,
        })
    }

    /// Keys whose field is `value`.
    fn matches_of(&self, value: u64) -> u64 {
        self.key_count / self.modulus + u64::from(value < self.key_count % self.modulus)
    }

    fn options(&self, value: u64) -> QueryOptions {
        let filter = Query {
            nodes: vec![QueryNode::Equal {
                field: self.field.to_owned(),
                value: FieldValue::I64(i64::try_from(value).unwrap_or(0)),
            }],
        };
        let options = QueryOptions::new()
            .prefix(KEY_PREFIX)
            .filter(filter)
            .limit(self.limit);
        if self.count_only {
            options.count_only()
        } else {
            options
        }
    }
}

/// What the window's answers said besides their latency.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QueryReport {
    /// The field compared.
    pub field: String,
    /// Share of the keys each query matches, in percent.
    pub selectivity_pct: f64,
    /// `index` or `scan`, as the cores reported it.
    pub access: String,
    /// Counts only, or pages.
    pub count_only: bool,
    /// Entries the cores examined per query, on average.
    pub examined_per_query: f64,
    /// Matches per query, on average (counted, or the page's items).
    pub matches_per_query: f64,
    /// Answers whose count or plan was not what the data says.
    pub wrong_answers: u64,
}

/// One session's share of a window.
struct Tally {
    record: Recorder,
    examined: u64,
    matches: u64,
    answers: u64,
    wrong: u64,
    scans: u64,
}

async fn session(client: Client, plan: QueryPlanSpec, seed: u64, until: Instant) -> Tally {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut tally = Tally {
        record: Recorder::new(),
        examined: 0,
        matches: 0,
        answers: 0,
        wrong: 0,
        scans: 0,
    };
    tally.record.prepare(&[Op::Query]);
    while Instant::now() < until {
        let value = rng.random_range(0..plan.modulus);
        let options = plan.options(value);
        let started = Instant::now();
        let outcome = client.query(&options).await;
        let latency = started.elapsed();
        match outcome {
            Ok(result) => {
                tally.record.record(Op::Query, latency, false);
                tally.answers += 1;
                tally.examined += result
                    .plans
                    .iter()
                    .map(|core| core.plan.examined)
                    .sum::<u64>();
                let is_scan = result
                    .plans
                    .iter()
                    .any(|core| core.plan.access == QueryAccess::Scan);
                tally.scans += u64::from(is_scan);
                let expected = plan.matches_of(value);
                let count_ok = if plan.count_only {
                    result.count == expected
                } else {
                    result.count == expected.min(u64::from(plan.limit))
                };
                let access_ok = is_scan == (plan.access == QueryAccessMode::Scan);
                tally.matches += result.count;
                tally.wrong += u64::from(!(count_ok && access_ok));
            }
            Err(_) => tally.record.record(Op::Query, latency, true),
        }
    }
    tally
}

/// Runs `sessions` query sessions for `duration` on `runtime`; returns what they recorded,
/// how long the window took and the report.
///
/// # Errors
/// A session's task failed.
pub fn measure(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    plan: &QueryPlanSpec,
    sessions: usize,
    duration: Duration,
    seed: u64,
) -> Result<(Recorder, Duration, QueryReport), String> {
    runtime.block_on(async {
        let started = Instant::now();
        let until = started + duration;
        let tasks: Vec<_> = (0..sessions)
            .map(|index| {
                tokio::spawn(session(
                    client.clone(),
                    plan.clone(),
                    seed.wrapping_add(index as u64),
                    until,
                ))
            })
            .collect();
        let mut record = Recorder::new();
        let mut totals = (0_u64, 0_u64, 0_u64, 0_u64, 0_u64);
        for task in tasks {
            let tally = task
                .await
                .map_err(|error| format!("a query session failed: {error}"))?;
            record.merge(&tally.record);
            totals.0 += tally.examined;
            totals.1 += tally.matches;
            totals.2 += tally.answers;
            totals.3 += tally.wrong;
            totals.4 += tally.scans;
        }
        let elapsed = started.elapsed();
        let (examined, matches, answers, wrong, scans) = totals;
        let per_query = |total: u64| {
            if answers == 0 {
                0.0
            } else {
                total as f64 / answers as f64
            }
        };
        let report = QueryReport {
            field: plan.field.to_owned(),
            selectivity_pct: 100.0 / plan.modulus as f64,
            access: if scans == 0 { "index" } else { "scan" }.to_owned(),
            count_only: plan.count_only,
            examined_per_query: per_query(examined),
            matches_per_query: per_query(matches),
            wrong_answers: wrong,
        };
        Ok((record, elapsed, report))
    })
}
