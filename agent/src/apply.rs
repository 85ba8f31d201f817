//! Applying rendered tables to the kernel, one atomic transaction per change, and drift
//! repair.
//!
//! * The first apply (and any apply after a failure or detected drift) replaces the whole
//!   table in one transaction (`add table; delete table; add table; …`): a restarted agent
//!   thus adopts whatever its predecessor left without a moment of no enforcement.
//! * Later applies are incremental ([`crate::diff::plan`]).
//! * After each successful transaction the kernel's table is read back without set
//!   contents (`nft -t`) plus the two dispatch maps; [`Applier::reconcile`] compares a new
//!   read-out with that image and rewrites the table if they differ (deleted table, edited
//!   chain, dispatch element removed). Edits of the *contents* of address sets are not
//!   detected (reading 100k-element sets every minute costs more than it is worth); a full
//!   rewrite at restart repairs them.
//! * A failed transaction changes nothing in the kernel (nftables batches are atomic); the
//!   error is counted and the next attempt is a full replacement.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{Histogram, HistogramOpts};
use serde_json::Value;

use crate::diff::{plan, Plan};
use crate::nft::{objects, Nft, NftError};
use crate::render::json::replace_all;
use crate::render::{CounterMeta, Ruleset, EGRESS_DISPATCH, INGRESS_DISPATCH};

/// What the metrics read: shared between the applier and the collector.
#[derive(Debug)]
pub struct ApplyStats {
    /// Successful transactions so far (0: nothing applied yet, not ready).
    pub generation: u64,
    pub errors: u64,
    pub last_success_unix: Option<f64>,
    /// Durations of successful transactions (the `nft` run alone).
    pub apply_duration: Histogram,
    /// Named counter → what it counts, for the table in force.
    pub counters: BTreeMap<String, CounterMeta>,
}

impl Default for ApplyStats {
    fn default() -> Self {
        let opts = HistogramOpts::new(
            "palisade_apply_duration_seconds",
            "Duration of successful nftables transactions.",
        )
        .buckets(vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]);
        ApplyStats {
            generation: 0,
            errors: 0,
            last_success_unix: None,
            apply_duration: Histogram::with_opts(opts)
                .expect("constant histogram options are valid"),
            counters: BTreeMap::new(),
        }
    }
}

pub type SharedStats = Arc<Mutex<ApplyStats>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyKind {
    Unchanged,
    Incremental,
    Full,
}

#[derive(Clone, Debug)]
pub struct ApplyOutcome {
    pub kind: ApplyKind,
    pub commands: usize,
    /// Time of the `nft` transaction alone.
    pub duration: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReconcileOutcome {
    InSync,
    Repaired,
}

pub struct Applier {
    nft: Nft,
    applied: Option<Ruleset>,
    image: Option<Value>,
    stats: SharedStats,
}

impl Applier {
    pub fn new(nft: Nft) -> Self {
        Applier {
            nft,
            applied: None,
            image: None,
            stats: SharedStats::default(),
        }
    }

    pub fn stats(&self) -> SharedStats {
        self.stats.clone()
    }

    pub fn nft(&self) -> &Nft {
        &self.nft
    }

    /// The table believed to be in force.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// Brings the kernel to `desired` in one transaction.
    pub fn apply(&mut self, desired: &Ruleset) -> Result<ApplyOutcome, NftError> {
        let (kind, cmds) = match &self.applied {
            None => (ApplyKind::Full, replace_all(desired)),
            Some(applied) => match plan(applied, desired) {
                Plan::Unchanged => {
                    // Labels may still have changed (a rule's origin).
                    self.lock().counters = desired.counters.clone();
                    self.applied = Some(desired.clone());
                    return Ok(ApplyOutcome {
                        kind: ApplyKind::Unchanged,
                        commands: 0,
                        duration: Duration::ZERO,
                    });
                }
                Plan::Incremental(cmds) => (ApplyKind::Incremental, cmds),
                Plan::Full => (ApplyKind::Full, replace_all(desired)),
            },
        };
        self.run(kind, &cmds, desired)
    }

    /// Replaces the whole table, whatever is believed to be there.
    pub fn apply_full(&mut self, desired: &Ruleset) -> Result<ApplyOutcome, NftError> {
        self.run(ApplyKind::Full, &replace_all(desired), desired)
    }

    fn run(
        &mut self,
        kind: ApplyKind,
        cmds: &[Value],
        desired: &Ruleset,
    ) -> Result<ApplyOutcome, NftError> {
        let start = Instant::now();
        let result = self.nft.apply(cmds);
        let duration = start.elapsed();
        if let Err(e) = result {
            self.lock().errors += 1;
            // The kernel kept the last good state, but our belief about it may be what
            // made the transaction fail (drift): the retry rewrites everything.
            self.applied = None;
            self.image = None;
            return Err(e);
        }
        {
            let mut stats = self.lock();
            stats.generation += 1;
            stats.last_success_unix = Some(unix_now());
            stats.apply_duration.observe(duration.as_secs_f64());
            stats.counters = desired.counters.clone();
        }
        // The image leaves set contents out, so a change of set elements alone leaves it
        // as it was; reading it back would cost a dump of every set element (nft fetches
        // them all even for `-t`), hundreds of milliseconds with 100k-element groups.
        let keep_image = kind == ApplyKind::Incremental
            && self.image.is_some()
            && self
                .applied
                .as_ref()
                .is_some_and(|applied| same_but_set_contents(applied, desired));
        self.applied = Some(desired.clone());
        if !keep_image {
            // Best effort: without an image the next reconcile rewrites the table.
            self.image = self.read_image().ok().flatten();
        }
        Ok(ApplyOutcome {
            kind,
            commands: cmds.len(),
            duration,
        })
    }

    /// Compares the kernel's table with what was applied and rewrites it to `desired` if
    /// they differ (or nothing was applied yet).
    pub fn reconcile(&mut self, desired: &Ruleset) -> Result<ReconcileOutcome, NftError> {
        let current = self.read_image()?;
        let in_sync =
            self.applied.as_ref() == Some(desired) && current.is_some() && current == self.image;
        if in_sync {
            return Ok(ReconcileOutcome::InSync);
        }
        if current.is_some() && current != self.image && self.image.is_some() {
            tracing::warn!(
                "nftables table inet palisade was changed outside the agent; rewriting it"
            );
        }
        self.apply_full(desired)?;
        Ok(ReconcileOutcome::Repaired)
    }

    /// The table without set contents, plus the dispatch maps, without handles and
    /// counter values. `None` when the table does not exist.
    fn read_image(&self) -> Result<Option<Value>, NftError> {
        let Some(table) = self.nft.list_table_terse()? else {
            return Ok(None);
        };
        let mut image = Vec::new();
        for doc in [
            Some(table),
            self.nft.list_map(EGRESS_DISPATCH)?,
            self.nft.list_map(INGRESS_DISPATCH)?,
        ]
        .into_iter()
        .flatten()
        {
            image.extend(
                objects(&doc)
                    .filter(|o| o.get("metainfo").is_none())
                    .cloned(),
            );
        }
        let mut image = Value::Array(image);
        strip_volatile(&mut image);
        Ok(Some(image))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ApplyStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether two tables differ at most in the elements of their named sets.
fn same_but_set_contents(a: &Ruleset, b: &Ruleset) -> bool {
    a.base_chains == b.base_chains
        && a.chains == b.chains
        && a.egress_dispatch == b.egress_dispatch
        && a.ingress_dispatch == b.ingress_dispatch
        && a.counters.keys().eq(b.counters.keys())
        && a.sets.len() == b.sets.len()
        && a.sets
            .iter()
            .zip(&b.sets)
            .all(|((na, sa), (nb, sb))| na == nb && sa.kind == sb.kind)
}

/// Removes what changes without anyone editing the table: handles and counter values.
fn strip_volatile(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("handle");
            if let Some(Value::Object(counter)) = map.get_mut("counter") {
                counter.remove("packets");
                counter.remove("bytes");
            }
            for x in map.values_mut() {
                strip_volatile(x);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_volatile),
        _ => {}
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_element_changes_keep_the_shape() {
        use crate::render::{AddrRange, IpFamily, RuleDef, SetDef, SetElement, SetKind, Verdict};
        let addr = |a: &str| {
            let ip = a.parse().unwrap();
            SetElement::Addr(AddrRange { lo: ip, hi: ip })
        };
        let mut a = Ruleset::default();
        a.sets.insert(
            "g-a_4".into(),
            SetDef {
                kind: SetKind::Addresses(IpFamily::V4),
                elements: vec![addr("10.0.0.1")],
            },
        );
        a.chains.insert("ingress/ns/a".into(), vec![]);
        let mut b = a.clone();
        b.sets
            .get_mut("g-a_4")
            .unwrap()
            .elements
            .push(addr("10.0.0.3"));
        assert!(same_but_set_contents(&a, &b));
        let mut c = b.clone();
        c.chains.get_mut("ingress/ns/a").unwrap().push(RuleDef {
            matches: vec![],
            counter: None,
            verdict: Verdict::Drop,
        });
        assert!(!same_but_set_contents(&b, &c), "a chain changed");
        let mut d = b.clone();
        d.sets.get_mut("g-a_4").unwrap().kind = SetKind::NamedPorts(IpFamily::V4);
        assert!(!same_but_set_contents(&b, &d), "a set's type changed");
        let mut e = b.clone();
        e.egress_dispatch
            .insert("veth1".into(), "egress/ns/a".into());
        assert!(
            !same_but_set_contents(&b, &e),
            "a dispatch element was added"
        );
    }

    #[test]
    fn volatile_fields_are_stripped() {
        let mut v = serde_json::json!([
            {"counter": {"name": "r-1", "handle": 4, "packets": 9, "bytes": 900}},
            {"rule": {"chain": "c", "handle": 7, "expr": [{"counter": "r-1"}]}}
        ]);
        strip_volatile(&mut v);
        assert_eq!(
            v,
            serde_json::json!([
                {"counter": {"name": "r-1"}},
                {"rule": {"chain": "c", "expr": [{"counter": "r-1"}]}}
            ])
        );
    }
}
