use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

/// `(epoch, key, value)` of one changelog record; `None` in a log slot is a
/// record compaction removed (offsets never move).
#[derive(Debug, Clone, PartialEq)]
struct Rec {
    epoch: u32,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

type Log = Vec<Option<Rec>>;
type State = BTreeMap<Vec<u8>, Vec<u8>>;

/// Restore a whole log the way `replay` does, into a map.
fn restore(log: &[Option<Rec>]) -> Result<(State, Restorer), MarkerDecodeError> {
    restore_with(Restorer::new(TaskMeta::default()), log)
}

/// [`restore`] with a given restorer.
fn restore_with(
    mut r: Restorer,
    log: &[Option<Rec>],
) -> Result<(State, Restorer), MarkerDecodeError> {
    let mut state = State::new();
    for (offset, rec) in log.iter().enumerate() {
        let Some(rec) = rec else { continue };
        if let Some(changes) = r.apply(offset as i64, rec.epoch, &rec.key, rec.value.as_deref())? {
            apply(&mut state, changes);
        }
    }
    Ok((state, r))
}

fn apply(state: &mut State, changes: Changes) {
    for (k, v) in changes {
        match v {
            Some(v) => state.insert(k, v),
            None => state.remove(&k),
        };
    }
}

/// Kafka's log cleaner, written from its documentation and independent of
/// the code under test: among the records before `cut`, keep only the last
/// record of each key (seen up to `cut`); then remove tombstones before
/// `tombstone_cut` (those older than `delete.retention.ms`).
fn compact(log: &[Option<Rec>], cut: usize, tombstone_cut: usize) -> Log {
    let cut = cut.min(log.len());
    let mut last: BTreeMap<&[u8], usize> = BTreeMap::new();
    for (i, rec) in log.iter().enumerate().take(cut) {
        if let Some(rec) = rec {
            last.insert(&rec.key, i);
        }
    }
    let mut out: Log = log.to_vec();
    for (i, slot) in out.iter_mut().enumerate().take(cut) {
        let superseded = slot
            .as_ref()
            .is_some_and(|rec| last.get(rec.key.as_slice()) != Some(&i));
        let old_tombstone =
            i < tombstone_cut.min(cut) && slot.as_ref().is_some_and(|r| r.value.is_none());
        if superseded || old_tombstone {
            *slot = None;
        }
    }
    out
}

type Change = (u8, Option<u8>);

fn key(k: u8) -> Vec<u8> {
    vec![b'k', k]
}

/// One owner (or a zombie: an owner that does not know it lost the
/// partition), writing the way the runtime does.
#[derive(Debug, Clone)]
struct Writer {
    epoch: u32,
    state: State,
    meta: TaskMeta,
    log_end: i64,
}

#[derive(Debug, Default)]
struct Sim {
    log: Log,
    owner: Option<Writer>,
    /// Old owners that will write one more batch after this many steps.
    zombies: Vec<(usize, Writer, Vec<Change>)>,
    /// The committed batches applied in order: what any restore must give.
    oracle: State,
    committed: i64,
}

impl Sim {
    fn push(&mut self, epoch: u32, key: Vec<u8>, value: Option<Vec<u8>>) -> i64 {
        self.log.push(Some(Rec { epoch, key, value }));
        self.log.len() as i64 - 1
    }

    fn marker(&mut self, w: &Writer) -> i64 {
        let value = serde_json::to_vec(&Marker::commit(&w.meta)).unwrap_or_default();
        self.push(w.epoch, commit_key(w.epoch), Some(value))
    }

    /// Foreign records in `from..` (everything there is someone else's).
    fn foreign(&self, epoch: u32, from: i64, until: i64) -> Foreign {
        let records: Vec<ChangelogRecord> = (from..until)
            .filter_map(|o| {
                self.log[o as usize].as_ref().map(|r| ChangelogRecord {
                    offset: o,
                    epoch: r.epoch,
                    key: r.key.clone(),
                    value: r.value.clone(),
                })
            })
            .collect();
        classify_foreign(epoch, &records)
    }

    fn repair(&mut self, w: &mut Writer, dirty: Vec<Vec<u8>>) {
        if dirty.is_empty() {
            return;
        }
        for k in dirty {
            let v = w.state.get(&k).cloned();
            self.push(w.epoch, k, v);
        }
        let at = self.marker(w);
        w.meta.changelog_offset = at;
        w.log_end = at + 1;
    }

    fn handle(&mut self, w: &mut Writer, foreign: Foreign) -> Result<(), TestCaseError> {
        match foreign {
            Foreign::None => Ok(()),
            Foreign::Zombie { dirty } => {
                self.repair(w, dirty);
                Ok(())
            }
            Foreign::Fenced { epoch } => Err(TestCaseError::fail(format!(
                "the current owner (epoch {}) was fenced by {epoch}",
                w.epoch
            ))),
        }
    }

    /// A new owner restores the log, claims, and repairs.
    fn claim(&mut self) -> Result<(), TestCaseError> {
        let (mut state, mut r) = restore(&self.log).map_err(|e| TestCaseError::fail(e.0))?;
        let epoch = r.max_epoch() + 1;
        let mut meta = r.meta.clone();
        if meta.lineage == 0 {
            meta.lineage = 1;
        }
        let at = self.log.len() as i64;
        let claim = serde_json::to_vec(&Claim::new(at, &meta)).unwrap_or_default();
        self.push(epoch, claim_key(epoch), Some(claim.clone()));
        let committed = r
            .apply(at, epoch, &claim_key(epoch), Some(claim.as_slice()))
            .map_err(|e| TestCaseError::fail(e.0))?;
        prop_assert!(committed.is_some(), "a claim at its offset is valid");
        apply(&mut state, committed.unwrap_or_default());
        let mut w = Writer {
            epoch,
            state,
            meta: r.meta.clone(),
            log_end: at + 1,
        };
        self.repair(&mut w, r.dirty());
        self.owner = Some(w);
        Ok(())
    }

    fn batch(&mut self, changes: &[Change]) -> Result<(), TestCaseError> {
        let Some(mut w) = self.owner.take() else {
            return self.claim();
        };
        let mut mine = Vec::new();
        let mut batch = Changes::default();
        for (k, v) in changes {
            batch.insert(key(*k), v.map(|v| vec![v]));
        }
        for (k, v) in &batch {
            mine.push(self.push(w.epoch, k.clone(), v.clone()));
        }
        w.meta.input_offset += 1;
        let at = self.marker(&w);
        mine.push(at);
        // The runtime's check after the marker: foreign offsets since log_end.
        let gaps = gaps(w.log_end, at, &mine);
        let foreign = match (gaps.first(), gaps.last()) {
            (Some(a), Some(b)) => self.foreign(w.epoch, *a, *b + 1),
            _ => Foreign::None,
        };
        if let Foreign::Fenced { epoch } = foreign {
            return Err(TestCaseError::fail(format!("owner fenced by {epoch}")));
        }
        w.meta.changelog_offset = at;
        w.log_end = at + 1;
        apply(&mut w.state, batch.clone());
        apply(&mut self.oracle, batch);
        self.committed += 1;
        self.handle(&mut w, foreign)?;
        self.owner = Some(w);
        Ok(())
    }

    /// The owner writes part of a batch and dies; a new owner takes over.
    fn crash(&mut self, changes: &[Change]) -> Result<(), TestCaseError> {
        if let Some(w) = self.owner.take() {
            for (k, v) in changes {
                self.push(w.epoch, key(*k), v.map(|v| vec![v]));
            }
        }
        self.claim()
    }

    /// A new owner claims; the old one may come back as a zombie later.
    fn handover(&mut self, zombie: Option<(usize, Vec<Change>)>) -> Result<(), TestCaseError> {
        let old = self.owner.take();
        self.claim()?;
        if let (Some(old), Some((after, changes))) = (old, zombie) {
            self.zombies.push((after, old, changes));
        }
        Ok(())
    }

    /// The zombie writes its batch and then, by its own check, finds out.
    fn zombie_writes(&mut self, mut z: Writer, changes: &[Change]) -> Result<(), TestCaseError> {
        let first = self.log.len() as i64;
        for (k, v) in changes {
            self.push(z.epoch, key(*k), v.map(|v| vec![v]));
        }
        z.meta.input_offset += 1;
        self.marker(&z);
        let seen = self.foreign(z.epoch, z.log_end, first);
        prop_assert!(
            matches!(seen, Foreign::Fenced { .. }),
            "a zombie must find itself fenced, found {seen:?}"
        );
        Ok(())
    }

    fn idle_check(&mut self) -> Result<(), TestCaseError> {
        let Some(mut w) = self.owner.take() else {
            return Ok(());
        };
        let end = self.log.len() as i64;
        let foreign = self.foreign(w.epoch, w.log_end, end);
        w.log_end = end;
        self.handle(&mut w, foreign)?;
        self.owner = Some(w);
        Ok(())
    }

    fn tick_zombies(&mut self, all: bool) -> Result<(), TestCaseError> {
        let mut due = Vec::new();
        self.zombies.retain_mut(|(after, z, changes)| {
            if all || *after == 0 {
                due.push((z.clone(), changes.clone()));
                false
            } else {
                *after -= 1;
                true
            }
        });
        for (z, changes) in due {
            self.zombie_writes(z, &changes)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Op {
    Batch(Vec<Change>),
    Crash(Vec<Change>),
    Handover(Option<(usize, Vec<Change>)>),
    Idle,
}

fn changes() -> impl Strategy<Value = Vec<Change>> {
    proptest::collection::vec((0u8..6, proptest::option::weighted(0.7, 0u8..4)), 0..4)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => changes().prop_map(Op::Batch),
        1 => changes().prop_map(Op::Crash),
        2 => proptest::option::of((0usize..4, changes())).prop_map(Op::Handover),
        1 => Just(Op::Idle),
    ]
}

fn run(ops: &[Op]) -> Result<Sim, TestCaseError> {
    let mut sim = Sim::default();
    sim.claim()?;
    for op in ops {
        sim.tick_zombies(false)?;
        match op {
            Op::Batch(c) => sim.batch(c)?,
            Op::Crash(c) => sim.crash(c)?,
            Op::Handover(z) => sim.handover(z.clone())?,
            Op::Idle => sim.idle_check()?,
        }
    }
    sim.tick_zombies(true)?;
    // The owner's periodic check: what zombies wrote is repaired.
    sim.idle_check()?;
    Ok(sim)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any compaction of a changelog written by owners, crashed owners and
    /// zombies restores exactly the committed batches applied in order.
    #[test]
    fn any_compaction_restores_the_committed_state(
        ops in proptest::collection::vec(op(), 1..40),
        cuts in proptest::collection::vec((0.0f64..=1.0, 0.0f64..=1.0), 1..4),
    ) {
        let sim = run(&ops)?;
        let expected = sim.oracle.clone();
        let (state, r) = restore(&sim.log).map_err(|e| TestCaseError::fail(e.0))?;
        prop_assert_eq!(&state, &expected, "uncompacted restore vs the committed batches");
        let progress = TaskMeta::default().input_offset + sim.committed;
        prop_assert_eq!(r.meta.input_offset, progress, "progress of the uncompacted restore");

        // Compact again and again at later cut points, as the cleaner does.
        let len = sim.log.len();
        let mut compacted = sim.log.clone();
        let mut cut = 0usize;
        for (c, t) in cuts {
            cut = cut.max((c * len as f64) as usize);
            let tombstone_cut = (t * cut as f64) as usize;
            compacted = compact(&compacted, cut, tombstone_cut);
            let (state, r) = restore(&compacted).map_err(|e| TestCaseError::fail(e.0))?;
            prop_assert_eq!(&state, &expected, "restore after compaction at {} (tombstones before {})", cut, tombstone_cut);
            prop_assert_eq!(r.meta.input_offset, progress);
        }
    }
}

/// The first format: every marker under one key, claims with `claim: true`.
fn legacy(claim: bool, input_offset: i64) -> Vec<u8> {
    let mut m = Marker::commit(&TaskMeta {
        input_offset,
        ..TaskMeta::default()
    });
    m.claim = claim;
    serde_json::to_vec(&m).unwrap_or_default()
}

#[test]
fn a_changelog_of_the_first_format_still_restores() -> Result<(), MarkerDecodeError> {
    let rec = |epoch, key: &[u8], value: Option<Vec<u8>>| {
        Some(Rec {
            epoch,
            key: key.to_vec(),
            value,
        })
    };
    let log = vec![
        rec(1, b"a", Some(b"1".to_vec())),
        rec(1, LEGACY_MARKER_KEY, Some(legacy(false, 10))),
        rec(1, b"b", Some(b"uncommitted".to_vec())),
        rec(2, LEGACY_MARKER_KEY, Some(legacy(true, 0))),
        rec(1, b"a", Some(b"zombie".to_vec())),
        rec(2, b"a", None),
        rec(2, b"c", Some(b"3".to_vec())),
        rec(2, LEGACY_MARKER_KEY, Some(legacy(false, 12))),
        rec(2, b"d", Some(b"tail".to_vec())),
    ];
    let (state, r) = restore(&log)?;
    assert_eq!(r.meta.input_offset, 12);
    assert_eq!(r.meta.epoch, 2);
    assert_eq!(r.meta.changelog_offset, 7);
    assert_eq!(
        state.into_iter().collect::<Vec<_>>(),
        vec![(b"c".to_vec(), b"3".to_vec())]
    );
    Ok(())
}

#[test]
fn a_claim_away_from_its_expected_offset_is_void() -> Result<(), MarkerDecodeError> {
    let meta = TaskMeta {
        lineage: 9,
        ..TaskMeta::default()
    };
    let claim_at = |at: i64| serde_json::to_vec(&Claim::new(at, &meta)).unwrap_or_default();
    let mut commit = meta.clone();
    commit.input_offset = 5;
    let log = vec![
        Some(Rec {
            epoch: 1,
            key: claim_key(1),
            value: Some(claim_at(0)),
        }),
        Some(Rec {
            epoch: 1,
            key: b"a".to_vec(),
            value: Some(b"1".to_vec()),
        }),
        // A second claimer read the log up to offset 1 and claimed late.
        Some(Rec {
            epoch: 2,
            key: claim_key(2),
            value: Some(claim_at(1)),
        }),
        Some(Rec {
            epoch: 1,
            key: commit_key(1),
            value: serde_json::to_vec(&Marker::commit(&commit)).ok(),
        }),
    ];
    let (state, r) = restore(&log)?;
    assert_eq!(r.max_epoch(), 1, "the void claim fences no one");
    assert_eq!(r.meta.input_offset, 5);
    assert_eq!(state.get(b"a".as_slice()), Some(&b"1".to_vec()));
    Ok(())
}

#[test]
fn foreign_records_fence_or_dirty() {
    let rec = |offset, epoch, key: &[u8]| ChangelogRecord {
        offset,
        epoch,
        key: key.to_vec(),
        value: None,
    };
    assert_eq!(classify_foreign(3, &[]), Foreign::None);
    assert_eq!(
        classify_foreign(3, &[rec(4, 2, b"x"), rec(5, 2, &commit_key(2))]),
        Foreign::Zombie {
            dirty: vec![b"x".to_vec()]
        }
    );
    assert_eq!(
        classify_foreign(
            3,
            &[
                rec(4, 2, b"x"),
                ChangelogRecord {
                    value: serde_json::to_vec(&Claim::new(5, &TaskMeta::default())).ok(),
                    ..rec(5, 4, &claim_key(4))
                }
            ]
        ),
        Foreign::Fenced { epoch: 4 }
    );
    let void = ChangelogRecord {
        value: serde_json::to_vec(&Claim::new(3, &TaskMeta::default())).ok(),
        ..rec(4, 5, &claim_key(5))
    };
    assert_eq!(
        classify_foreign(3, std::slice::from_ref(&void)),
        Foreign::Zombie { dirty: vec![] },
        "a void claim (it landed after someone else's write) fences no one"
    );
    let valid = ChangelogRecord {
        value: serde_json::to_vec(&Claim::new(4, &TaskMeta::default())).ok(),
        ..void
    };
    assert_eq!(classify_foreign(3, &[valid]), Foreign::Fenced { epoch: 5 });
    assert_eq!(
        classify_foreign(3, &[rec(4, 3, b"x")]),
        Foreign::Zombie {
            dirty: vec![b"x".to_vec()]
        },
        "a stray copy of our own (a retried produce round): rewritten, not fatal"
    );
    assert_eq!(gaps(10, 14, &[10, 12, 14]), vec![11, 13]);
}

/// An entry's timer, for the derived-timer tests: keys `e/…` whose value
/// is the due time in decimal.
fn due_of(key: &[u8], value: &[u8]) -> Option<i64> {
    if !key.starts_with(b"e/") {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn state_rec(epoch: u32, key: &[u8], value: Option<&[u8]>) -> Option<Rec> {
    Some(Rec {
        epoch,
        key: key.to_vec(),
        value: value.map(<[u8]>::to_vec),
    })
}

fn marker_rec(epoch: u32) -> Option<Rec> {
    let meta = TaskMeta {
        epoch,
        ..TaskMeta::default()
    };
    state_rec(
        epoch,
        &commit_key(epoch),
        serde_json::to_vec(&Marker::commit(&meta)).ok().as_deref(),
    )
}

/// Restore `log` as `restore` does, deriving timers with [`due_of`].
fn restore_deriving(log: &[Option<Rec>]) -> Result<State, MarkerDecodeError> {
    let restorer = Restorer::new(TaskMeta::default()).deriving_timers(Some(due_of));
    restore_with(restorer, log).map(|(state, _)| state)
}

#[test]
fn a_restore_sets_the_timer_of_every_committed_entry_and_keeps_logged_timers() {
    let old_timer = crate::operator::timer_key(9, b"old");
    let log = vec![
        state_rec(1, b"e/a", Some(b"5")),
        state_rec(1, b"e/b", Some(b"7")),
        // A timer logged by a version that logged them: applied as state.
        state_rec(1, &old_timer, Some(b"")),
        state_rec(1, b"other", Some(b"x")),
        marker_rec(1),
        state_rec(1, b"e/a", None),
        marker_rec(1),
        // Not committed: no entry, no timer.
        state_rec(1, b"e/c", Some(b"8")),
    ];
    let Ok(state) = restore_deriving(&log) else {
        panic!("the log restores");
    };
    let expected: State = [
        (b"e/b".to_vec(), b"7".to_vec()),
        (b"other".to_vec(), b"x".to_vec()),
        (old_timer.clone(), Vec::new()),
        // e/a's timer outlives its delete: it fires and finds nothing.
        (crate::operator::timer_key(5, b"e/a"), Vec::new()),
        (crate::operator::timer_key(7, b"e/b"), Vec::new()),
    ]
    .into_iter()
    .collect();
    assert_eq!(state, expected);
    let Ok((plain, _)) = restore(&log) else {
        panic!("the log restores");
    };
    let logged: State = [
        (b"e/b".to_vec(), b"7".to_vec()),
        (b"other".to_vec(), b"x".to_vec()),
        (old_timer, Vec::new()),
    ]
    .into_iter()
    .collect();
    assert_eq!(plain, logged, "without derivation, nothing is added");
}

proptest! {
    /// Whatever the batches, commits and compaction, every entry a
    /// restore brings back has the timer of its current due time, and
    /// every timer it sets is one a committed write of its key implied.
    #[test]
    fn derived_timers_cover_every_restored_entry(
        batches in prop::collection::vec(
            (prop::collection::vec((0u8..4, prop::option::of(0i64..50)), 1..5), any::<bool>()),
            1..8,
        ),
        cut in 0usize..64,
    ) {
        let mut log: Log = Vec::new();
        // What a batch-by-batch replay of the committed batches gives,
        // and every (key, due) a committed batch wrote.
        let mut live: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
        let mut written: std::collections::BTreeSet<(Vec<u8>, i64)> = Default::default();
        for (writes, committed) in &batches {
            let mut batch: BTreeMap<Vec<u8>, Option<i64>> = BTreeMap::new();
            for (k, due) in writes {
                batch.insert(vec![b'e', b'/', b'a' + k], *due);
            }
            for (k, due) in &batch {
                let value = due.map(|d| d.to_string().into_bytes());
                log.push(state_rec(1, k, value.as_deref()));
            }
            if *committed {
                log.push(marker_rec(1));
                for (k, due) in batch {
                    match due {
                        Some(d) => {
                            written.insert((k.clone(), d));
                            live.insert(k, d);
                        }
                        None => {
                            live.remove(&k);
                        }
                    }
                }
            } else {
                // An uncommitted tail, then a new owner's claim of it.
                break;
            }
        }
        // Compaction up to the last marker at most: past it, an
        // uncommitted tail would hide committed values until a repair
        // (tested above), which is not what this property is about.
        let last_marker = log
            .iter()
            .rposition(|r| r.as_ref().is_some_and(|r| RecordKind::of(&r.key) == RecordKind::Commit))
            .map_or(0, |i| i + 1);
        let log = compact(&log, cut.min(last_marker), 0);
        let state = restore_deriving(&log).map_err(|e| TestCaseError::fail(e.0))?;
        for (k, due) in &live {
            prop_assert_eq!(state.get(k.as_slice()), Some(&due.to_string().into_bytes()));
            let timer = crate::operator::timer_key(*due, k);
            prop_assert!(state.contains_key(&timer), "no timer for {:?} at {}", k, due);
        }
        for key in state.keys().filter(|k| crate::operator::is_timer_key(k)) {
            let Some((at, of)) = crate::operator::parse_timer_key(key) else {
                return Err(TestCaseError::fail("a timer key that does not parse"));
            };
            prop_assert!(written.contains(&(of, at)), "a timer no committed write implied");
        }
        let entries = state.keys().filter(|k| !crate::operator::is_timer_key(k)).count();
        prop_assert_eq!(entries, live.len());
    }
}
