//! Applying rendered tables to the kernel, one atomic transaction per change, and drift
//! repair.
//!
//! * A full apply when the kernel has no table of ours (the agent's first start on a node,
//!   or someone deleted the table) is staged, because nft is slow with 150,000 set
//!   elements, thousands of counter declarations and 11,000 rules: (1) netlink batches
//!   create the table (refused if one appeared meanwhile), its named counters
//!   ([`crate::nfnl::counters`]) and its regular chains, empty; (2) one nft transaction
//!   (text) declares the sets and maps and loads the elements that are not host
//!   addresses; (3) netlink batches append every chain's rules ([`crate::nfnl::rules`],
//!   encoded as nft encodes them, anonymous sets included) and load the host sets'
//!   elements ([`crate::nfnl::setelem`]); (4) one batch adds the base chains, which hook
//!   the table into the packet path. Before (4) the table sees no packet, so
//!   enforcement starts atomically, complete; if a step after the table's creation fails,
//!   the table, which never enforced, is deleted again.
//! * A full apply when our table exists (restart adoption, drift repair, a set type
//!   change, the retry after a failure) replaces it in one nft transaction (`add table;
//!   delete table; add table; …`, as text): a restarted agent thus adopts whatever its
//!   predecessor left without a moment of no enforcement, and never a half state.
//! * Later applies are incremental ([`crate::diff::plan`]): one netlink batch
//!   ([`crate::nfnl::transaction`]) unless a set is declared or deleted, which is one nft
//!   transaction (nft 1.0.6 fetches every named object of the table before a rule
//!   command: ~30 ms with 10,000 counters).
//! * After each transaction that changed more than host set elements, the table is read
//!   back over netlink ([`crate::nfnl::image`]: chains, rules, set declarations, objects
//!   and the dispatch maps, without handles and counter values, plus a digest of each
//!   set's elements ([`crate::nfnl::digest`]); host sets' digests are computed from the
//!   elements loaded, not read back): whole after a full apply, and after an incremental
//!   one only where it touched the table ([`image::refresh`]). After a host-element batch the image's digests are
//!   updated from the batch's own elements. [`Applier::reconcile`] reads the table again,
//!   every set's elements included (~80 ms with 150,000), and replaces the table if
//!   anything differs: deleted table, edited chain or rule, dispatch element removed, a set
//!   element added, removed or swapped by hand.
//! * A failed transaction changes nothing in the kernel (nftables and netlink batches are
//!   atomic); the error is counted and the next attempt is a full replacement.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{Histogram, HistogramOpts};

use crate::diff::{carry_sizes, elements_only, netlink_only, plan, to_commands, Plan, Step};
use crate::nfnl::counters;
use crate::nfnl::image::{self, TableImage, Touched};
use crate::nfnl::rules as nfnl_rules;
use crate::nfnl::setelem::{self, Change, Op};
use crate::nfnl::{digest, scratch, transaction};
use crate::nfnl::{NfnlError, NfnlSocket};
use crate::nft::{Nft, NftError};
use crate::render::json;
use crate::render::text;
use crate::render::{
    CounterMeta, RuleDef, Ruleset, SetDef, SetElement, SetKind, DISPATCH_MAPS, TABLE,
};

/// What the metrics read: shared between the applier and the collector.
#[derive(Debug)]
pub struct ApplyStats {
    /// Successful transactions so far (0: nothing applied yet, not ready).
    pub generation: u64,
    pub errors: u64,
    pub last_success_unix: Option<f64>,
    /// Durations of successful transactions (the `nft` run alone).
    pub apply_duration: Histogram,
    /// Named counter → what it counts, for the table in force (the applied table's map).
    pub counters: Arc<BTreeMap<String, CounterMeta>>,
    /// Host set elements of the last rule set rendered ([`host_addresses`]).
    pub host_addresses: u64,
    /// Whether that rule set was refused for exceeding `max_host_addresses`.
    pub over_cap: bool,
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
            counters: Arc::default(),
            host_addresses: 0,
            over_cap: false,
        }
    }
}

/// Elements of the table's host address sets, summed over groups and families: what
/// `max_host_addresses` caps (issue 12.8), and what the kernel holds one element each of.
pub fn host_addresses(table: &Ruleset) -> u64 {
    table
        .sets
        .values()
        .filter(|s| matches!(s.kind, SetKind::Hosts(_)))
        .map(|s| s.elements.len() as u64)
        .sum()
}

/// A rule set with more host addresses than configured.
#[derive(Debug, thiserror::Error)]
#[error("the rule set holds {count} host addresses, more than max_host_addresses ({cap}); it is refused and the last rules stay in force")]
pub struct OverCap {
    pub count: u64,
    pub cap: u64,
}

/// Refuses a table over the cap.
pub fn check_cap(table: &Ruleset, cap: u64) -> Result<u64, OverCap> {
    match host_addresses(table) {
        count if count > cap => Err(OverCap { count, cap }),
        count => Ok(count),
    }
}

pub type SharedStats = Arc<Mutex<ApplyStats>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyKind {
    Unchanged,
    /// The table found (a restart's) was already the desired one: kept, counters too.
    Adopted,
    Incremental,
    Full,
}

#[derive(Clone, Debug)]
pub struct ApplyOutcome {
    pub kind: ApplyKind,
    /// nft commands and element changes of the transaction(s).
    pub commands: usize,
    /// Time of the kernel transactions alone (nft runs and netlink batches).
    pub duration: Duration,
    /// Each transaction and the read-back, in order: where the time went.
    pub phases: Vec<(&'static str, Duration)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReconcileOutcome {
    InSync,
    Repaired,
}

pub struct Applier {
    nft: Nft,
    applied: Option<Ruleset>,
    image: Option<TableImage>,
    stats: SharedStats,
    /// Opened on first use, in the namespace `nft` acts in; dropped after an error.
    socket: Option<NfnlSocket>,
    digests: HostDigests,
}

/// Host set name → (the elements last loaded, their digest): a set's digest is computed
/// again only when its elements change.
#[derive(Default)]
struct HostDigests(HashMap<String, (Arc<[SetElement]>, u64)>);

impl HostDigests {
    fn remember(&mut self, name: &str, elements: &Arc<[SetElement]>, digest: u64) {
        self.0.insert(name.to_string(), (elements.clone(), digest));
    }

    fn of(&mut self, name: &str, elements: &Arc<[SetElement]>) -> u64 {
        match self.0.get(name) {
            Some((cached, digest)) if Arc::ptr_eq(cached, elements) => *digest,
            _ => {
                let d = digest::of_hosts(elements);
                self.0.insert(name.to_string(), (elements.clone(), d));
                d
            }
        }
    }
}

/// Runs `f`, recording its duration under `name`.
fn timed<T>(
    phases: &mut Vec<(&'static str, Duration)>,
    name: &'static str,
    f: impl FnOnce() -> T,
) -> T {
    let start = Instant::now();
    let out = f();
    phases.push((name, start.elapsed()));
    out
}

fn netlink_error(e: NfnlError) -> NftError {
    NftError::Netlink(e.to_string())
}

/// Phase names, as [`ApplyOutcome::phases`] reports them.
pub mod phase {
    pub const NFT: &str = "nft transaction";
    pub const NFT_UNHOOKED: &str = "nft: table without base chains";
    pub const NETLINK_COUNTERS: &str = "netlink: table and counters";
    pub const NETLINK_ELEMENTS: &str = "netlink: set elements";
    /// An incremental transaction of chains, rules, counters and elements.
    pub const NETLINK_TRANSACTION: &str = "netlink: transaction";
    /// A first load's regular chains and their rules.
    pub const NETLINK_RULES: &str = "netlink: chains and rules";
    pub const NFT_HOOK: &str = "nft: base chains";
    pub const NETLINK_HOOK: &str = "netlink: base chains";
    pub const READ_BACK: &str = "read-back (netlink)";
    pub const ADOPT: &str = "compare with the table found";
}

impl Applier {
    pub fn new(nft: Nft) -> Self {
        Applier {
            nft,
            applied: None,
            image: None,
            stats: SharedStats::default(),
            socket: None,
            digests: HostDigests::default(),
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

    /// Brings the kernel to `desired` in one transaction (a first load: see the module
    /// docs).
    pub fn apply(&mut self, desired: &Ruleset) -> Result<ApplyOutcome, NftError> {
        let Some(applied) = &self.applied else {
            return self.apply_full(desired);
        };
        let steps = match plan(applied, desired) {
            Plan::Full => return self.apply_full(desired),
            Plan::Unchanged => {
                // Labels may still have changed (a rule's origin).
                self.applied = Some(carry_sizes(applied, desired));
                self.lock().counters = desired.counters.clone();
                return Ok(ApplyOutcome {
                    kind: ApplyKind::Unchanged,
                    commands: 0,
                    duration: Duration::ZERO,
                    phases: Vec::new(),
                });
            }
            Plan::Incremental(steps) => steps,
        };
        let next = carry_sizes(applied, desired);
        let mut phases = Vec::new();
        let over_netlink = netlink_only(&steps);
        // Host set elements alone: the image's only change is those sets' element counts
        // and digests, known without reading the table again (the point of this path is
        // speed). Any other change reads again what it touched.
        // Only sets whose digests are computed from their elements ([`setelem::handles`]);
        // a class map's is read again.
        let digests_known = steps
            .iter()
            .all(|s| matches!(s, Step::Elements { kind, .. } if setelem::handles(*kind)));
        let keep_image = elements_only(&steps) && digests_known && self.image.is_some();
        let image = match keep_image {
            true => Image::Keep,
            false => Image::Refresh(touched(applied, desired, &steps)),
        };
        if keep_image {
            if let Some(image) = &mut self.image {
                for step in &steps {
                    let Step::Elements {
                        set, op, elements, ..
                    } = step
                    else {
                        continue;
                    };
                    let Some(def) = desired.sets.get(set) else {
                        continue;
                    };
                    image.set_count(set, def.elements.len());
                    // A sum of element hashes: the change costs its own elements only.
                    let delta = digest::of_hosts(elements);
                    if let Some(old) = image.digest(set) {
                        let new = match op {
                            Op::Add => old.wrapping_add(delta),
                            Op::Delete => old.wrapping_sub(delta),
                        };
                        image.set_digest(set, new);
                        self.digests.remember(set, &def.elements, new);
                    }
                }
            }
        }
        let name = match elements_only(&steps) {
            true => phase::NETLINK_ELEMENTS,
            false => phase::NETLINK_TRANSACTION,
        };
        let sent = match over_netlink {
            true => timed(&mut phases, name, || {
                self.with_socket(|s| transaction::apply(s, TABLE, &steps))
                    .map_err(netlink_error)
            }),
            false => Ok(false),
        };
        let result = match sent {
            Ok(true) => Ok(()),
            Err(e) => Err(e),
            Ok(false) => {
                let cmds = to_commands(&steps);
                timed(&mut phases, phase::NFT, || self.nft.apply(&cmds))
            }
        };
        self.finish(
            ApplyKind::Incremental,
            result.map(|()| steps.len()),
            next,
            phases,
            image,
        )
    }

    /// Replaces the whole table, whatever is believed to be there (staged when there is
    /// no table: see the module docs).
    pub fn apply_full(&mut self, desired: &Ruleset) -> Result<ApplyOutcome, NftError> {
        let mut phases = Vec::new();
        let absent = matches!(
            self.with_socket(|s| image::table_exists(s, TABLE)),
            Ok(false)
        );
        if !absent && self.applied.is_none() {
            // A restart (or a retry after a failure): keep a table that is already the
            // desired one, counters and all (issue 12.10).
            let adopted = timed(&mut phases, phase::ADOPT, || self.adopt(desired));
            match adopted {
                Ok(Some(current)) => {
                    self.image = Some(current);
                    return self.finish(
                        ApplyKind::Adopted,
                        Ok(0),
                        desired.clone(),
                        phases,
                        Image::Keep,
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot compare the table found with the rules; replacing it")
                }
            }
        }
        let result = if absent {
            self.staged_load(desired, &mut phases)
        } else {
            self.replace(desired, &mut phases)
        };
        self.finish(
            ApplyKind::Full,
            result,
            desired.clone(),
            phases,
            Image::Read,
        )
    }

    /// The full replacement as one nft transaction, even when no table exists (for
    /// measuring it; [`Applier::apply_full`] picks the staged load then).
    pub fn apply_replace(&mut self, desired: &Ruleset) -> Result<ApplyOutcome, NftError> {
        let mut phases = Vec::new();
        let result = self.replace(desired, &mut phases);
        self.finish(
            ApplyKind::Full,
            result,
            desired.clone(),
            phases,
            Image::Read,
        )
    }

    fn replace(
        &mut self,
        desired: &Ruleset,
        phases: &mut Vec<(&'static str, Duration)>,
    ) -> Result<usize, NftError> {
        // One transaction: `add` so that the delete cannot fail, then the table anew.
        let replace = format!(
            "add table inet {TABLE}\ndelete table inet {TABLE}\n{}",
            text::to_text(desired)
        );
        let objects = 3 + text::unhooked_objects(desired, |_| true) + desired.base_chains.len();
        timed(phases, phase::NFT, || self.nft.apply_text(replace))?;
        Ok(objects)
    }

    /// The staged first load (module docs).
    fn staged_load(
        &mut self,
        desired: &Ruleset,
        phases: &mut Vec<(&'static str, Duration)>,
    ) -> Result<usize, NftError> {
        let counters: Vec<&str> = desired.counters.keys().map(String::as_str).collect();
        let chains: Vec<&str> = desired.chains.keys().map(String::as_str).collect();
        timed(phases, phase::NETLINK_COUNTERS, || {
            // Refused if a table appeared meanwhile: then it is not ours to delete.
            self.with_socket(|s| counters::create_table(s, TABLE))
                .map_err(netlink_error)?;
            self.with_socket(|s| {
                counters::create(s, TABLE, &counters)?;
                // Empty, so that the map elements nft loads next can name them.
                transaction::create_chains(s, TABLE, &chains)
            })
            .map_err(netlink_error)
            .inspect_err(|_| self.delete_unhooked())
        })?;
        // Rules over netlink once the sets they look up exist; nft keeps a chain with a
        // rule netlink does not encode (none today: an empty list).
        let by_nft = |rules: &[RuleDef]| !rules.iter().all(nfnl_rules::encodable);
        let with_elements = |kind| !setelem::handles(kind);
        let unhooked = text::unhooked_text_of(desired, with_elements, by_nft);
        let objects = 1 + counters.len() + text::unhooked_objects(desired, with_elements);
        timed(phases, phase::NFT_UNHOOKED, || {
            self.nft.apply_text(unhooked)
        })
        .inspect_err(|_| self.delete_unhooked())?;
        let netlink_chains: Vec<(&str, &[RuleDef])> = desired
            .chains
            .iter()
            .filter(|(_, rules)| !by_nft(rules))
            .map(|(name, rules)| (name.as_str(), rules.as_slice()))
            .collect();
        timed(phases, phase::NETLINK_RULES, || {
            match self.with_socket(|s| transaction::append_rules(s, TABLE, &netlink_chains)) {
                Ok(true) => Ok(()),
                Ok(false) => Err(netlink_error(NfnlError::Malformed(
                    "a rule netlink cannot encode was not left to nft",
                ))),
                Err(e) => Err(netlink_error(e)),
            }
        })
        .inspect_err(|_| self.delete_unhooked())?;
        let changes: Vec<Change<'_>> = desired
            .sets
            .iter()
            .filter(|(_, s)| setelem::handles(s.kind) && !s.elements.is_empty())
            .map(|(name, s)| Change {
                set: name,
                kind: s.kind,
                op: Op::Add,
                elements: &s.elements,
            })
            .collect();
        let hook = json::create_base_chains(desired);
        let loaded = timed(phases, phase::NETLINK_ELEMENTS, || {
            // Not yet hooked: the elements may load in several transactions.
            self.with_socket(|s| {
                setelem::apply_in_batches(s, TABLE, &changes, setelem::UNHOOKED_BATCH_MESSAGES)
            })
            .map_err(netlink_error)
        })
        .and_then(|()| {
            timed(phases, phase::NETLINK_HOOK, || {
                self.with_socket(|s| transaction::add_base_chains(s, TABLE, &desired.base_chains))
                    .map_err(netlink_error)
            })
        })
        .and_then(|sent| match sent {
            true => Ok(()),
            false => timed(phases, phase::NFT_HOOK, || self.nft.apply(&hook)),
        });
        if let Err(e) = loaded {
            self.delete_unhooked();
            return Err(e);
        }
        Ok(objects + changes.len() + hook.len())
    }

    /// Deletes the table of a first load that failed before its base chains: nothing
    /// hooked it into the packet path yet, so it never enforced, and a half-loaded table
    /// must not stay behind.
    fn delete_unhooked(&mut self) {
        if let Err(cleanup) = self.nft.apply(&[json::delete_table()]) {
            tracing::error!(error = %cleanup, "cannot delete the half-loaded table");
        }
    }

    /// The kernel's table (its image), if it is exactly what `desired` loads; `None` when
    /// it must be replaced. The comparison is image with image: `desired` is loaded into a
    /// scratch table, dormant (its base chains hook nothing) and without host set
    /// elements (their digests come from `desired`), read back and deleted again.
    fn adopt(&mut self, desired: &Ruleset) -> Result<Option<TableImage>, NftError> {
        let Some(current) = self.read_image(None)? else {
            return Ok(None);
        };
        if !current.has_base_chains() {
            tracing::warn!(
                "table inet palisade found incomplete (no base chains, so it filtered nothing: a first load was interrupted); replacing it"
            );
            return Ok(None);
        }
        if !current.is_active() {
            tracing::warn!("table inet palisade found dormant; replacing it");
            return Ok(None);
        }
        let scratch = self.scratch_image(desired);
        let dropped = self.with_socket(|s| scratch::delete(s, scratch::TABLE));
        if let Err(e) = dropped {
            tracing::warn!(error = %e, "cannot delete the scratch table {}", scratch::TABLE);
        }
        let Some(scratch) = scratch? else {
            return Ok(None);
        };
        let (current_c, scratch_c) = (current.canonical(), scratch.canonical());
        if current_c == scratch_c {
            tracing::info!(
                "table inet palisade found as the rules want it; adopted, counters kept"
            );
            Ok(Some(current))
        } else {
            tracing::info!(
                differences = ?current_c.differences(&scratch_c, 5),
                "table inet palisade found differs from the rules; replacing it"
            );
            Ok(None)
        }
    }

    fn scratch_image(&mut self, desired: &Ruleset) -> Result<Option<TableImage>, NftError> {
        let _ = self.with_socket(|s| scratch::delete(s, scratch::TABLE));
        self.with_socket(|s| scratch::create_dormant(s, scratch::TABLE))
            .map_err(netlink_error)?;
        let mut cmds = json::create_unhooked(desired, |kind| !setelem::handles(kind));
        cmds.extend(json::create_base_chains(desired));
        let cmds: Vec<_> = cmds
            .into_iter()
            .map(|c| scratch::renamed(c, TABLE, scratch::TABLE))
            .collect();
        self.nft.apply(&cmds)?;
        let Some(mut image) = self
            .with_socket(|s| image::read(s, scratch::TABLE, &DISPATCH_MAPS))
            .map_err(netlink_error)?
        else {
            return Ok(None);
        };
        for name in image.set_names() {
            let digest = match desired.sets.get(&name).filter(|s| setelem::handles(s.kind)) {
                Some(def) => {
                    image.set_count(&name, def.elements.len());
                    Some(self.digests.of(&name, &def.elements))
                }
                None => self
                    .with_socket(|s| digest::read(s, scratch::TABLE, &name))
                    .map_err(netlink_error)?,
            };
            if let Some(d) = digest {
                image.set_digest(&name, d);
            }
        }
        Ok(Some(image))
    }

    /// Bookkeeping after a transaction: stats, the table in force, the read-back image.
    fn finish(
        &mut self,
        kind: ApplyKind,
        result: Result<usize, NftError>,
        next: Ruleset,
        mut phases: Vec<(&'static str, Duration)>,
        image: Image,
    ) -> Result<ApplyOutcome, NftError> {
        let duration = phases.iter().map(|(_, d)| *d).sum();
        let commands = match result {
            Ok(n) => n,
            Err(e) => {
                self.lock().errors += 1;
                // The kernel kept the last good state, but our belief about it may be
                // what made the transaction fail (drift): the retry rewrites everything.
                self.applied = None;
                self.image = None;
                return Err(e);
            }
        };
        {
            let mut stats = self.lock();
            stats.generation += 1;
            stats.last_success_unix = Some(unix_now());
            stats
                .apply_duration
                .observe(Duration::as_secs_f64(&duration));
            stats.counters = next.counters.clone();
        }
        // Best effort: without an image the next reconcile rewrites the table.
        match image {
            Image::Keep => {}
            Image::Read => {
                self.image = timed(&mut phases, phase::READ_BACK, || {
                    self.read_image(Some(&next))
                })
                .ok()
                .flatten();
            }
            Image::Refresh(touched) => {
                self.image = timed(&mut phases, phase::READ_BACK, || {
                    self.refresh_image(&touched, &next)
                })
                .ok()
                .flatten();
            }
        }
        self.applied = Some(next);
        Ok(ApplyOutcome {
            kind,
            commands,
            duration,
            phases,
        })
    }

    /// Compares the kernel's table with what was applied and rewrites it to `desired` if
    /// they differ (or nothing was applied yet).
    pub fn reconcile(&mut self, desired: &Ruleset) -> Result<ReconcileOutcome, NftError> {
        let current = self.read_image(None)?;
        let in_sync = self
            .applied
            .as_ref()
            .is_some_and(|a| same_table(a, desired))
            && current.is_some()
            && current == self.image;
        if in_sync {
            return Ok(ReconcileOutcome::InSync);
        }

        if let (Some(now), Some(believed)) = (&current, &self.image) {
            if now != believed {
                let changed = believed.differences(now, 5).join(", ");
                tracing::warn!(
                    changed,
                    "nftables table inet palisade was changed outside the agent; rewriting it"
                );
            }
        }
        self.apply_full(desired)?;
        Ok(ReconcileOutcome::Repaired)
    }

    /// The kernel's table without handles and counter values, with a digest of every
    /// set's elements; `None` when the table does not exist. Host sets' digests come from
    /// `loaded` (the table just applied) when given: reading 150,000 elements back after
    /// every apply would cost more than loading them did; a reconcile reads them all.
    fn read_image(&mut self, loaded: Option<&Ruleset>) -> Result<Option<TableImage>, NftError> {
        let Some(mut image) = self
            .with_socket(|s| image::read(s, TABLE, &DISPATCH_MAPS))
            .map_err(netlink_error)?
        else {
            return Ok(None);
        };
        self.fill_digests(&mut image, loaded)?;
        Ok(Some(image))
    }

    /// The digests `image` lacks: host sets' from `loaded` where given, the others read.
    fn fill_digests(
        &mut self,
        image: &mut TableImage,
        loaded: Option<&Ruleset>,
    ) -> Result<(), NftError> {
        for name in image.set_names() {
            if image.digest(&name).is_some() {
                continue;
            }
            let host = loaded
                .and_then(|r| r.sets.get(&name))
                .filter(|s| setelem::handles(s.kind));
            let digest = match host {
                Some(def) => Some(self.digests.of(&name, &def.elements)),
                None => self
                    .with_socket(|s| digest::read(s, TABLE, &name))
                    .map_err(netlink_error)?,
            };
            if let Some(d) = digest {
                image.set_digest(&name, d);
            }
        }
        Ok(())
    }

    /// The image after an incremental transaction: the one before with what the
    /// transaction touched read again ([`image::refresh`]); a whole read without one.
    fn refresh_image(
        &mut self,
        touched: &Touched,
        loaded: &Ruleset,
    ) -> Result<Option<TableImage>, NftError> {
        let Some(mut current) = self.image.take() else {
            return self.read_image(Some(loaded));
        };
        let exists = self
            .with_socket(|s| image::refresh(s, TABLE, &DISPATCH_MAPS, &mut current, touched))
            .map_err(netlink_error)?;
        if !exists {
            return Ok(None);
        }
        self.fill_digests(&mut current, Some(loaded))?;
        Ok(Some(current))
    }

    fn with_socket<T>(
        &mut self,
        f: impl FnOnce(&mut NfnlSocket) -> Result<T, NfnlError>,
    ) -> Result<T, NfnlError> {
        let socket = match &mut self.socket {
            Some(socket) => socket,
            None => self
                .socket
                .insert(NfnlSocket::open(self.nft.netns.as_deref())?),
        };
        let out = f(socket);
        if out.is_err() {
            // Late answers of a failed exchange must not be read as the next one's.
            self.socket = None;
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ApplyStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What becomes of the image after a transaction.
enum Image {
    /// It is up to date (or was updated on the way).
    Keep,
    /// Read again whole.
    Read,
    /// Read again where the transaction touched it.
    Refresh(Touched),
}

/// What an incremental transaction (`steps`, from `applied` to `desired`) changes, for
/// the image: the chains and counters its steps name (the plan already compared the
/// 10,000 counters once), the sets whose elements differ and the dispatch maps whose
/// elements it changes.
fn touched(applied: &Ruleset, desired: &Ruleset, steps: &[Step]) -> Touched {
    let mut chains = BTreeSet::new();
    let mut counters = Vec::new();
    let mut maps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut declared = false;
    for step in steps {
        match step {
            Step::Chain { name, .. } | Step::Rule { chain: name, .. } => {
                chains.insert(name);
            }
            Step::Counter { name, .. } => counters.push(name.clone()),
            Step::Dispatch { map, entries, .. } => {
                let keys = maps.entry(map.to_string()).or_default();
                keys.extend(entries.iter().map(|(ifname, _)| ifname.clone()));
            }
            Step::Nft(_) => declared = true,
            Step::Elements { .. } => {}
        }
    }
    let sets = desired
        .sets
        .iter()
        .filter(|(name, set)| {
            applied
                .sets
                .get(*name)
                .is_none_or(|old| old.kind != set.kind || !same_elements(old, set))
        })
        .map(|(name, _)| name.clone())
        .collect();
    Touched {
        chains: chains.into_iter().cloned().collect(),
        counters,
        sets,
        maps,
        declared,
    }
}

/// Whether two sets hold the same elements: the same allocation (a group that did not
/// change), checked first, as comparing 150,000 elements costs a millisecond.
fn same_elements(a: &SetDef, b: &SetDef) -> bool {
    Arc::ptr_eq(&a.elements, &b.elements) || a.elements == b.elements
}

/// Whether the table applied is the one desired, set sizes aside (an existing set keeps
/// the size it was created with).
fn same_table(applied: &Ruleset, desired: &Ruleset) -> bool {
    applied.base_chains == desired.base_chains
        && applied.chains == desired.chains
        && applied.counters == desired.counters
        && applied.egress_dispatch == desired.egress_dispatch
        && applied.ingress_dispatch == desired.ingress_dispatch
        && applied.egress_rest_dispatch == desired.egress_rest_dispatch
        && applied.ingress_rest_dispatch == desired.ingress_rest_dispatch
        && applied.sets.len() == desired.sets.len()
        && applied
            .sets
            .iter()
            .zip(&desired.sets)
            .all(|((na, a), (nb, b))| na == nb && a.kind == b.kind && same_elements(a, b))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
