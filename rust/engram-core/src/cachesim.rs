//! Trace-driven cache simulation of a table's row accesses: what fraction of lookups a memory
//! budget serves, for a static hot set chosen from row counts, for online row-granular policies
//! (LRU, CLOCK, CLOCK with TinyLFU-style admission) and for an LRU page cache (what a memory
//! mapping gets from the kernel), all at the same memory.
//!
//! A trace is a sequence of global row ids in access order, cut into batches (one gather call
//! each). Every simulation runs twice:
//! - over every lookup ("all": the policy sees each lookup, duplicates included), and
//! - over the distinct rows of each batch ("distinct": each row once per batch, in the order of
//!   its first lookup there), which is what a table that deduplicates a call sees: its misses are
//!   the rows it reads from disk.
//!
//! Row `r` occupies bytes `[r * row_bytes, (r + 1) * row_bytes)` of the table's file; the page
//! cache needs every page of that range (a row may span two pages), and a lookup hits there only
//! when all its pages do.
//!
//! The policies, exactly (the tests hold them to small reference implementations):
//! - `static`: the `budget / row_bytes` rows with the highest counts (ties: the smaller row id
//!   first; rows never counted are never hot), chosen once, never changed ([`hot_order`]).
//! - `lru`: a hit moves the row to the front; a miss inserts it at the front and, when the cache
//!   is full, evicts the row at the back.
//! - `clock` (second chance): slots in a ring with a reference bit each; a hit sets the bit; a
//!   miss fills the next empty slot while there is one (bit clear), else the hand clears set bits
//!   and advances until it finds a clear one, evicts that row, puts the new one there (bit clear)
//!   and moves one slot on.
//! - `tinylfu_clock`: CLOCK whose misses are admitted only when the new row's frequency is
//!   higher than the victim's (ties keep the victim, and the hand stays on it). Frequencies are
//!   exact counts of the lookups the cache has seen, counted before the decision, all halved
//!   (rounding down) once every `10 * capacity` lookups, before the lookup that follows the
//!   `10 * capacity`-th: TinyLFU's sample and reset, with exact counters instead of a sketch.
//! - `page_lru`: LRU over pages of `page_bytes` (4 KiB for the kernel's page cache).

use crate::{EngramError, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// An empty slot or a row without one.
const NONE: u32 = u32::MAX;

/// The TinyLFU sample: frequencies are halved once every `WINDOW_PER_ROW * capacity` lookups.
pub const WINDOW_PER_ROW: u64 = 10;

/// A cache policy the simulation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// The hottest rows of the counts, fixed.
    Static,
    /// Least recently used rows.
    Lru,
    /// CLOCK (second chance) over rows.
    Clock,
    /// CLOCK with TinyLFU-style frequency admission.
    TinyLfuClock,
    /// Least recently used pages of the table's file.
    PageLru,
}

impl Policy {
    /// Every policy, in the order results are given.
    pub const ALL: [Policy; 5] = [
        Policy::Static,
        Policy::Lru,
        Policy::Clock,
        Policy::TinyLfuClock,
        Policy::PageLru,
    ];

    /// The policy's name ("static", "lru", "clock", "tinylfu_clock", "page_lru").
    pub fn name(self) -> &'static str {
        match self {
            Policy::Static => "static",
            Policy::Lru => "lru",
            Policy::Clock => "clock",
            Policy::TinyLfuClock => "tinylfu_clock",
            Policy::PageLru => "page_lru",
        }
    }

    /// The policy of `name`.
    pub fn parse(name: &str) -> Result<Policy> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                EngramError::Invalid(format!(
                    "unknown cache policy {name:?}: pass one of {}",
                    Policy::ALL.map(|p| p.name()).join(", ")
                ))
            })
    }

    /// Whether the policy caches pages (else rows).
    pub fn is_paged(self) -> bool {
        self == Policy::PageLru
    }
}

/// How a trace is cut into batches (one gather call each).
#[derive(Clone, Copy, Debug)]
pub enum Batches<'a> {
    /// Batches of this many lookups (the last one may be shorter).
    Every(u64),
    /// Cumulative offsets: batch `i` is `trace[offsets[i]..offsets[i + 1]]`; they start at 0,
    /// never decrease and end at the trace's length.
    Offsets(&'a [u64]),
}

/// The counts a static hot set is chosen from.
#[derive(Clone, Copy, Debug)]
pub enum HotCounts<'a> {
    /// The simulated trace's own counts (in-sample: the best a static set can do on it).
    InSample,
    /// The counts of another trace (a training trace: held-out figures).
    Trace(&'a [u64]),
    /// Precomputed counts: `counts[i]` lookups of row `rows[i]` (a row given twice: summed).
    Counts { rows: &'a [u64], counts: &'a [u64] },
}

/// What a simulation measures and how.
#[derive(Clone, Copy, Debug)]
pub struct SimConfig<'a> {
    /// Bytes of one row in the table's file (264 for FP8 rows of 256 values with their scales).
    pub row_bytes: u64,
    /// Bytes of one page of the page cache (4096).
    pub page_bytes: u64,
    /// Memory budgets in bytes; each policy runs once per budget.
    pub budgets: &'a [u64],
    /// The policies to run.
    pub policies: &'a [Policy],
    /// Where the static hot set's counts come from.
    pub hot: HotCounts<'a>,
}

/// The counts of one simulated stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Row lookups the stream made.
    pub lookups: u64,
    /// Lookups served from the cache (for pages: all the row's pages were resident).
    pub hits: u64,
    /// Page accesses (0 for row policies): a row spanning two pages counts two.
    pub page_accesses: u64,
    /// Page accesses that found the page resident.
    pub page_hits: u64,
}

/// One policy at one budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outcome {
    pub policy: Policy,
    /// The budget in bytes.
    pub budget: u64,
    /// Rows (pages for `page_lru`) the budget holds: `budget / row_bytes` (`/ page_bytes`).
    pub capacity: u64,
    /// Rows (pages) held: the static hot set's size (at most `capacity`: only counted rows are
    /// hot), or what the online cache held at the end of the "all" stream.
    pub held: u64,
    /// Every lookup of the trace.
    pub all: Tally,
    /// Each distinct row of a batch once (what a deduplicating table sees).
    pub distinct: Tally,
    /// Wall seconds of this policy's two runs (one after the other on one thread), preparation
    /// excluded.
    pub seconds: f64,
}

/// The simulation's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Lookups in the trace.
    pub lookups: u64,
    /// Distinct rows summed over batches.
    pub distinct_lookups: u64,
    /// Distinct rows of the whole trace.
    pub distinct_rows: u64,
    /// Distinct pages the trace's rows touch (0 when no page policy ran).
    pub distinct_pages: u64,
    /// Batches (empty ones included).
    pub batches: u64,
    /// Wall seconds spent numbering rows and pages, deduplicating batches and ranking the
    /// static hot set (once for all policies).
    pub prepare_seconds: f64,
    /// One per (budget, policy), budgets outer, policies in the order asked.
    pub outcomes: Vec<Outcome>,
}

/// A hasher of one `u64` (the splitmix64 finalizer): row and page ids are keys here.
#[derive(Default)]
struct Mix(u64);

impl Hasher for Mix {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        self.0 = z ^ (z >> 31);
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<Mix>>;

/// `ids` dense: each distinct id numbered in order of first appearance; returns the numbers and
/// the id of each number.
fn densify(ids: impl Iterator<Item = u64>, hint: usize) -> Result<(Vec<u32>, Vec<u64>)> {
    let mut map: IdMap<u32> = IdMap::default();
    let mut keys = Vec::new();
    let mut dense = Vec::with_capacity(hint);
    for id in ids {
        let next = keys.len();
        let d = *map.entry(id).or_insert_with(|| {
            keys.push(id);
            next as u32
        });
        if keys.len() >= NONE as usize {
            return Err(EngramError::Invalid(format!(
                "a trace of more than {} distinct rows or pages is more than the simulation \
                 holds: simulate a shorter trace",
                NONE - 1
            )));
        }
        dense.push(d);
    }
    Ok((dense, keys))
}

/// Checks `batches` against a trace of `len` lookups; returns the batch bounds.
fn batch_bounds(batches: Batches<'_>, len: usize) -> Result<Vec<(usize, usize)>> {
    match batches {
        Batches::Every(0) => Err(EngramError::Invalid(
            "batch size 0: a batch holds at least one lookup (pass a positive batch size)".into(),
        )),
        Batches::Every(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            Ok((0..len)
                .step_by(n)
                .map(|s| (s, s.saturating_add(n).min(len)))
                .collect())
        }
        Batches::Offsets(off) => {
            let (Some(&first), Some(&last)) = (off.first(), off.last()) else {
                return Err(EngramError::Invalid(
                    "batch offsets are empty: pass at least [0, len(trace)]".into(),
                ));
            };
            if first != 0 {
                return Err(EngramError::Invalid(format!(
                    "batch offsets start at {first}: the first offset must be 0"
                )));
            }
            if let Some(i) = off.windows(2).position(|w| w[1] < w[0]) {
                return Err(EngramError::Invalid(format!(
                    "batch offsets decrease at position {}: {} after {} (offsets must never \
                     decrease)",
                    i + 1,
                    off[i + 1],
                    off[i]
                )));
            }
            if last != len as u64 {
                return Err(EngramError::Invalid(format!(
                    "batch offsets end at {last} but the trace holds {len} lookups: the last \
                     offset must be the trace's length"
                )));
            }
            Ok(off
                .windows(2)
                .map(|w| (w[0] as usize, w[1] as usize))
                .collect())
        }
    }
}

/// Rows by count, highest first (ties: smaller row id first), rows counted 0 times left out: the
/// static hot set of a budget of `k` rows is the first `k`.
pub fn hot_order(rows: &[u64], counts: &[u64]) -> Result<Vec<u64>> {
    if rows.len() != counts.len() {
        return Err(EngramError::Invalid(format!(
            "{} rows but {} counts: pass one count per row",
            rows.len(),
            counts.len()
        )));
    }
    let mut sum: IdMap<u64> = IdMap::default();
    for (&r, &c) in rows.iter().zip(counts) {
        let e = sum.entry(r).or_insert(0);
        *e = e.saturating_add(c);
    }
    Ok(order_counted(sum))
}

/// The rows of `sum` with a positive count, by count descending then row ascending.
fn order_counted(sum: IdMap<u64>) -> Vec<u64> {
    let mut by: Vec<(u64, u64)> = sum.into_iter().filter(|&(_, c)| c > 0).collect();
    by.par_sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    by.into_iter().map(|(r, _)| r).collect()
}

/// The rows of a trace by count ([`hot_order`]'s rule).
fn trace_order(trace: &[u64]) -> Vec<u64> {
    let mut sum: IdMap<u64> = IdMap::default();
    for &r in trace {
        *sum.entry(r).or_insert(0) += 1;
    }
    order_counted(sum)
}

/// Rows a budget of `budget` bytes holds at `row_bytes` a row.
fn rows_in(budget: u64, row_bytes: u64) -> Result<u64> {
    if row_bytes == 0 {
        return Err(EngramError::Invalid(
            "row_bytes = 0: a row occupies at least one byte (264 for FP8 rows of 256 values \
             with scales)"
                .into(),
        ));
    }
    Ok(budget / row_bytes)
}

/// The static hot set of a budget: the `budget / row_bytes` rows with the highest counts
/// ([`hot_order`]'s rule), sorted by row id. The tiered table's static hot set is this set.
pub fn static_hot_set(
    rows: &[u64],
    counts: &[u64],
    row_bytes: u64,
    budget: u64,
) -> Result<Vec<u64>> {
    let k = rows_in(budget, row_bytes)?;
    let mut hot = hot_order(rows, counts)?;
    hot.truncate(usize::try_from(k).unwrap_or(usize::MAX));
    hot.sort_unstable();
    Ok(hot)
}

/// One online cache over dense keys `0..n`.
trait Cache {
    /// Looks `key` up (and admits it on a miss, as the policy says); true on a hit.
    fn access(&mut self, key: u32) -> bool;
    /// Keys held now.
    fn held(&self) -> u64;
}

/// An LRU cache: a doubly linked list of slots, most recent at `head`.
struct Lru {
    slot_of: Vec<u32>,
    key: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    cap: usize,
}

impl Lru {
    fn new(keys: usize, cap: usize) -> Lru {
        let cap = cap.min(keys);
        Lru {
            slot_of: vec![NONE; keys],
            key: Vec::with_capacity(cap),
            prev: Vec::with_capacity(cap),
            next: Vec::with_capacity(cap),
            head: NONE,
            tail: NONE,
            cap,
        }
    }

    fn unlink(&mut self, s: u32) {
        let (p, n) = (self.prev[s as usize], self.next[s as usize]);
        if p == NONE {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NONE {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
    }

    fn push_front(&mut self, s: u32) {
        self.prev[s as usize] = NONE;
        self.next[s as usize] = self.head;
        if self.head == NONE {
            self.tail = s;
        } else {
            self.prev[self.head as usize] = s;
        }
        self.head = s;
    }
}

impl Cache for Lru {
    fn access(&mut self, key: u32) -> bool {
        if self.cap == 0 {
            return false;
        }
        let s = self.slot_of[key as usize];
        if s != NONE {
            if s != self.head {
                self.unlink(s);
                self.push_front(s);
            }
            return true;
        }
        let s = if self.key.len() < self.cap {
            self.key.push(key);
            self.prev.push(NONE);
            self.next.push(NONE);
            (self.key.len() - 1) as u32
        } else {
            let s = self.tail;
            self.unlink(s);
            self.slot_of[self.key[s as usize] as usize] = NONE;
            self.key[s as usize] = key;
            s
        };
        self.slot_of[key as usize] = s;
        self.push_front(s);
        false
    }

    fn held(&self) -> u64 {
        self.key.len() as u64
    }
}

/// A CLOCK ring: slots with a reference bit each and a hand.
struct Ring {
    slot_of: Vec<u32>,
    key: Vec<u32>,
    referenced: Vec<bool>,
    hand: usize,
    cap: usize,
}

impl Ring {
    fn new(keys: usize, cap: usize) -> Ring {
        let cap = cap.min(keys);
        Ring {
            slot_of: vec![NONE; keys],
            key: Vec::with_capacity(cap),
            referenced: Vec::with_capacity(cap),
            hand: 0,
            cap,
        }
    }

    /// Sets the bit of a resident `key`; false when it is not resident.
    fn touch(&mut self, key: u32) -> bool {
        let s = self.slot_of[key as usize];
        if s != NONE {
            self.referenced[s as usize] = true;
        }
        s != NONE
    }

    /// Puts `key` in the next empty slot; false when the ring is full.
    fn fill(&mut self, key: u32) -> bool {
        if self.key.len() == self.cap {
            return false;
        }
        self.slot_of[key as usize] = self.key.len() as u32;
        self.key.push(key);
        self.referenced.push(false);
        true
    }

    /// Clears set bits from the hand on until a clear one; that slot (the hand stays there).
    fn victim(&mut self) -> usize {
        while self.referenced[self.hand] {
            self.referenced[self.hand] = false;
            self.hand = (self.hand + 1) % self.cap;
        }
        self.hand
    }

    /// Replaces the row of slot `s` (the hand's) by `key`, bit clear, and moves the hand on.
    fn replace(&mut self, s: usize, key: u32) {
        self.slot_of[self.key[s] as usize] = NONE;
        self.key[s] = key;
        self.referenced[s] = false;
        self.slot_of[key as usize] = s as u32;
        self.hand = (s + 1) % self.cap;
    }
}

/// CLOCK (second chance).
struct Clock(Ring);

impl Cache for Clock {
    fn access(&mut self, key: u32) -> bool {
        let r = &mut self.0;
        if r.cap == 0 {
            return false;
        }
        if r.touch(key) {
            return true;
        }
        if !r.fill(key) {
            let v = r.victim();
            r.replace(v, key);
        }
        false
    }

    fn held(&self) -> u64 {
        self.0.key.len() as u64
    }
}

/// CLOCK with TinyLFU-style admission over exact, periodically halved counts. The halving is
/// lazy: a key's count carries the epoch it was last brought to, and is shifted right by the
/// epochs since when read (repeated halving rounding down is one shift).
struct TinyLfu {
    ring: Ring,
    count: Vec<u32>,
    epoch_of: Vec<u32>,
    epoch: u32,
    seen: u64,
    window: u64,
}

impl TinyLfu {
    fn new(keys: usize, cap: usize) -> TinyLfu {
        TinyLfu {
            ring: Ring::new(keys, cap),
            count: vec![0; keys],
            epoch_of: vec![0; keys],
            epoch: 0,
            seen: 0,
            window: WINDOW_PER_ROW.saturating_mul(cap as u64),
        }
    }

    /// The frequency of `key` now (bringing it to the current epoch).
    fn freq(&mut self, key: u32) -> u32 {
        let k = key as usize;
        let lag = self.epoch - self.epoch_of[k];
        if lag > 0 {
            self.count[k] = self.count[k].checked_shr(lag).unwrap_or(0);
            self.epoch_of[k] = self.epoch;
        }
        self.count[k]
    }
}

impl Cache for TinyLfu {
    fn access(&mut self, key: u32) -> bool {
        if self.ring.cap == 0 {
            return false;
        }
        if self.seen == self.window {
            self.epoch += 1;
            self.seen = 0;
        }
        self.seen += 1;
        let f = self.freq(key).saturating_add(1);
        self.count[key as usize] = f;
        if self.ring.touch(key) {
            return true;
        }
        if !self.ring.fill(key) {
            let v = self.ring.victim();
            let incumbent = self.ring.key[v];
            if f > self.freq(incumbent) {
                self.ring.replace(v, key);
            }
        }
        false
    }

    fn held(&self) -> u64 {
        self.ring.key.len() as u64
    }
}

/// A trace made dense: rows and pages numbered, each batch's distinct rows, each row's pages.
struct Prepared {
    /// Dense row of each lookup.
    all: Vec<u32>,
    /// Dense rows of each batch, once each, in order of first lookup there.
    distinct: Vec<u32>,
    /// Row id of each dense row.
    rows: Vec<u64>,
    /// Dense pages of dense row `d`: `pages[page_start[d]..page_start[d + 1]]`.
    page_start: Vec<u32>,
    pages: Vec<u32>,
    distinct_pages: usize,
    batches: usize,
}

fn prepare(
    trace: &[u64],
    batches: Batches<'_>,
    row_bytes: u64,
    page_bytes: u64,
    paged: bool,
) -> Result<Prepared> {
    rows_in(0, row_bytes)?;
    if page_bytes == 0 {
        return Err(EngramError::Invalid(
            "page_bytes = 0: a page holds at least one byte (4096 for the kernel's page cache)"
                .into(),
        ));
    }
    if trace.len() >= NONE as usize {
        return Err(EngramError::Invalid(format!(
            "a trace of {} lookups is longer than the simulation holds (at most {}): simulate \
             a part of it",
            trace.len(),
            NONE - 1
        )));
    }
    let bounds = batch_bounds(batches, trace.len())?;
    let (all, rows) = densify(trace.iter().copied(), trace.len())?;
    let mut stamp = vec![NONE; rows.len()];
    let mut distinct = Vec::with_capacity(all.len());
    for (b, &(s, e)) in bounds.iter().enumerate() {
        let b = b as u32;
        for &d in &all[s..e] {
            if stamp[d as usize] != b {
                stamp[d as usize] = b;
                distinct.push(d);
            }
        }
    }
    // Each row's byte range [r * rb, (r + 1) * rb) in pages; the range must be a file offset.
    let mut spans = Vec::with_capacity(if paged { rows.len() } else { 0 });
    let mut total: u64 = 0;
    for (i, &r) in rows.iter().enumerate() {
        let end = (u128::from(r) + 1) * u128::from(row_bytes);
        if end > u128::from(u64::MAX) {
            let pos = trace.iter().position(|&x| x == r).unwrap_or(i);
            return Err(EngramError::Invalid(format!(
                "row id {r} at position {pos} ends at byte {end} of the file, beyond 2^64: row \
                 ids times row_bytes must be file offsets"
            )));
        }
        let first = u128::from(r) * u128::from(row_bytes) / u128::from(page_bytes);
        let last = (end - 1) / u128::from(page_bytes);
        if paged {
            total += (last - first + 1) as u64;
            spans.push((first as u64, last as u64));
        }
    }
    if total >= u64::from(NONE) {
        return Err(EngramError::Invalid(format!(
            "the trace's rows span {total} pages, more than the simulation holds: use larger \
             pages or a shorter trace"
        )));
    }
    let page_ids = spans.iter().flat_map(|&(a, b)| a..=b);
    let (pages, page_keys) = densify(page_ids, total as usize)?;
    let mut page_start = Vec::with_capacity(spans.len() + 1);
    page_start.push(0u32);
    let mut at = 0u32;
    for &(a, b) in &spans {
        at += (b - a + 1) as u32;
        page_start.push(at);
    }
    Ok(Prepared {
        all,
        distinct,
        rows,
        page_start,
        pages,
        distinct_pages: page_keys.len(),
        batches: bounds.len(),
    })
}

/// Runs `cache` over the rows of `stream`.
fn run_rows(cache: &mut impl Cache, stream: &[u32]) -> Tally {
    let hits = stream.iter().filter(|&&d| cache.access(d)).count() as u64;
    Tally {
        lookups: stream.len() as u64,
        hits,
        ..Tally::default()
    }
}

/// Runs `cache` over the pages of the rows of `stream`.
fn run_pages(cache: &mut impl Cache, stream: &[u32], p: &Prepared) -> Tally {
    let mut t = Tally {
        lookups: stream.len() as u64,
        ..Tally::default()
    };
    for &d in stream {
        let pages =
            &p.pages[p.page_start[d as usize] as usize..p.page_start[d as usize + 1] as usize];
        let mut all = true;
        for &pg in pages {
            let hit = cache.access(pg);
            t.page_hits += u64::from(hit);
            all &= hit;
        }
        t.page_accesses += pages.len() as u64;
        t.hits += u64::from(all);
    }
    t
}

/// Simulates `policies` at each of `budgets` over `trace`, cut into `batches`.
pub fn simulate(trace: &[u64], batches: Batches<'_>, cfg: &SimConfig<'_>) -> Result<Report> {
    let start = std::time::Instant::now();
    let paged = cfg.policies.iter().any(|p| p.is_paged());
    let p = prepare(trace, batches, cfg.row_bytes, cfg.page_bytes, paged)?;
    let keys = p.rows.len();
    // The rank of each dense row in the hot order (NONE when not in it), for the static set.
    let (rank, hot_rows) = if cfg.policies.contains(&Policy::Static) {
        let order = match cfg.hot {
            HotCounts::InSample => trace_order(trace),
            HotCounts::Trace(t) => trace_order(t),
            HotCounts::Counts { rows, counts } => hot_order(rows, counts)?,
        };
        let mut pos: IdMap<u32> = IdMap::default();
        pos.reserve(keys);
        for (i, &r) in p.rows.iter().enumerate() {
            pos.insert(r, i as u32);
        }
        let mut rank = vec![NONE; keys];
        // Ranks past u32 are beyond every budget the trace can fill (it has fewer rows).
        for (i, r) in order.iter().enumerate().take(NONE as usize) {
            if let Some(&d) = pos.get(r) {
                rank[d as usize] = i as u32;
            }
        }
        (rank, order.len() as u64)
    } else {
        (Vec::new(), 0)
    };
    let prepare_seconds = start.elapsed().as_secs_f64();
    let jobs: Vec<(u64, Policy)> = cfg
        .budgets
        .iter()
        .flat_map(|&b| cfg.policies.iter().map(move |&pol| (b, pol)))
        .collect();
    let outcomes = jobs
        .par_iter()
        .map(|&(budget, policy)| {
            let start = std::time::Instant::now();
            let unit = if policy.is_paged() {
                cfg.page_bytes
            } else {
                cfg.row_bytes
            };
            let capacity = budget / unit;
            let cap = usize::try_from(capacity).unwrap_or(usize::MAX);
            let both = |run: &dyn Fn(&[u32]) -> (Tally, u64)| {
                let ((all, held), (distinct, _)) = (run(&p.all), run(&p.distinct));
                (all, distinct, held)
            };
            let (all, distinct, held) = match policy {
                Policy::Static => {
                    let k = capacity.min(u64::from(NONE));
                    let hot = |s: &[u32]| Tally {
                        lookups: s.len() as u64,
                        hits: s
                            .iter()
                            .filter(|&&d| u64::from(rank[d as usize]) < k)
                            .count() as u64,
                        ..Tally::default()
                    };
                    let held = capacity.min(hot_rows);
                    (hot(&p.all), hot(&p.distinct), held)
                }
                Policy::Lru => both(&|s| {
                    let mut c = Lru::new(keys, cap);
                    (run_rows(&mut c, s), c.held())
                }),
                Policy::Clock => both(&|s| {
                    let mut c = Clock(Ring::new(keys, cap));
                    (run_rows(&mut c, s), c.held())
                }),
                Policy::TinyLfuClock => both(&|s| {
                    let mut c = TinyLfu::new(keys, cap);
                    (run_rows(&mut c, s), c.held())
                }),
                Policy::PageLru => both(&|s| {
                    let mut c = Lru::new(p.distinct_pages, cap);
                    (run_pages(&mut c, s, &p), c.held())
                }),
            };
            Outcome {
                policy,
                budget,
                capacity,
                held,
                all,
                distinct,
                seconds: start.elapsed().as_secs_f64(),
            }
        })
        .collect();
    Ok(Report {
        lookups: trace.len() as u64,
        distinct_lookups: p.distinct.len() as u64,
        distinct_rows: keys as u64,
        distinct_pages: p.distinct_pages as u64,
        batches: p.batches as u64,
        prepare_seconds,
        outcomes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain LRU over any keys: the list in recency order, front most recent.
    fn lru_ref(trace: &[u64], cap: usize) -> u64 {
        let mut list: Vec<u64> = Vec::new();
        let mut hits = 0;
        for &k in trace {
            if let Some(i) = list.iter().position(|&x| x == k) {
                hits += 1;
                list.remove(i);
            } else if list.len() == cap {
                list.pop();
            }
            if cap > 0 {
                list.insert(0, k);
            }
        }
        hits
    }

    /// A plain CLOCK: (key, bit) slots, a hand; `admit(candidate, victim)` decides a miss on a
    /// full ring (CLOCK admits always).
    fn clock_ref(trace: &[u64], cap: usize, tinylfu: bool) -> u64 {
        let mut slots: Vec<(u64, bool)> = Vec::new();
        let mut hand = 0;
        let mut hits = 0;
        let mut freq: HashMap<u64, u32> = HashMap::new();
        let mut seen = 0u64;
        let window = 10 * cap as u64;
        for &k in trace {
            if cap == 0 {
                continue;
            }
            if tinylfu {
                if seen == window {
                    freq.values_mut().for_each(|c| *c /= 2);
                    seen = 0;
                }
                seen += 1;
                *freq.entry(k).or_insert(0) += 1;
            }
            if let Some(s) = slots.iter_mut().find(|s| s.0 == k) {
                s.1 = true;
                hits += 1;
                continue;
            }
            if slots.len() < cap {
                slots.push((k, false));
                continue;
            }
            while slots[hand].1 {
                slots[hand].1 = false;
                hand = (hand + 1) % cap;
            }
            let admit = !tinylfu || freq[&k] > freq.get(&slots[hand].0).copied().unwrap_or(0);
            if admit {
                slots[hand] = (k, false);
                hand = (hand + 1) % cap;
            }
        }
        hits
    }

    fn rng(seed: &mut u64) -> u64 {
        let mut m = Mix::default();
        *seed += 1;
        m.write_u64(*seed);
        m.finish()
    }

    /// A skewed random trace of `n` lookups over about `rows` rows.
    fn skewed(n: usize, rows: u64, seed: u64) -> Vec<u64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                let a = rng(&mut s) % rows;
                let b = rng(&mut s) % (a + 1);
                b * 7 + 3
            })
            .collect()
    }

    fn run(
        trace: &[u64],
        batch: u64,
        row_bytes: u64,
        budgets: &[u64],
        pol: Policy,
    ) -> Vec<Outcome> {
        let cfg = SimConfig {
            row_bytes,
            page_bytes: 4096,
            budgets,
            policies: &[pol],
            hot: HotCounts::InSample,
        };
        simulate(trace, Batches::Every(batch), &cfg)
            .unwrap()
            .outcomes
    }

    #[test]
    fn cachesim_online_policies_match_references() {
        for seed in 0..6 {
            let trace = skewed(3000, 200, seed);
            for cap in [0u64, 1, 2, 5, 17, 60, 400] {
                let budget = [cap * 8];
                let lru = run(&trace, 64, 8, &budget, Policy::Lru)[0];
                assert_eq!(lru.all.hits, lru_ref(&trace, cap as usize), "lru cap {cap}");
                let clock = run(&trace, 64, 8, &budget, Policy::Clock)[0];
                assert_eq!(clock.all.hits, clock_ref(&trace, cap as usize, false));
                let tlfu = run(&trace, 64, 8, &budget, Policy::TinyLfuClock)[0];
                assert_eq!(tlfu.all.hits, clock_ref(&trace, cap as usize, true));
                assert_eq!(lru.all.lookups, 3000);
            }
        }
    }

    #[test]
    fn cachesim_hand_made_traces() {
        // LRU of 2: a b a c b -> a hit (a), then c evicts b, b misses.
        let t = [1, 2, 1, 3, 2];
        assert_eq!(run(&t, 10, 1, &[2], Policy::Lru)[0].all.hits, 1);
        // CLOCK of 2: a b a(bit) c: hand clears a, evicts b; b: hand at a (clear) evicts a.
        let t = [1, 2, 1, 3, 2, 3];
        let c = run(&t, 10, 1, &[2], Policy::Clock)[0];
        assert_eq!(c.all.hits, 2); // a, then the last c
                                   // TinyLFU of 1: a a b (b freq 1 < a 2: rejected) a (hit) b b (freq 3 > 3? no, 3 = 3).
        let t = [1, 1, 2, 1, 2, 2, 2];
        assert_eq!(
            run(&t, 10, 1, &[1], Policy::TinyLfuClock)[0].all.hits,
            clock_ref(&t, 1, true)
        );
    }

    #[test]
    fn cachesim_distinct_counts_each_row_once_per_batch() {
        let t = [5, 5, 6, 5, 6, 6, 7];
        let o = run(&t, 4, 8, &[1 << 20], Policy::Lru)[0];
        // Batches [5 5 6 5] [6 6 7]: distinct streams 5 6 | 6 7.
        assert_eq!(o.distinct.lookups, 4);
        assert_eq!(o.distinct.hits, 1);
        assert_eq!(o.all.hits, 4);
    }

    #[test]
    fn cachesim_pages_span() {
        // 264-byte rows: row 15 is bytes 3960..4224, pages 0 and 1.
        let o = run(&[15, 15, 0], 10, 264, &[2 * 4096], Policy::PageLru)[0];
        assert_eq!(o.all.page_accesses, 5);
        assert_eq!(o.all.page_hits, 3);
        assert_eq!(o.all.hits, 2);
        // One page of memory: the spanning row always misses (its two pages evict each other).
        let o = run(&[15, 15], 10, 264, &[4096], Policy::PageLru)[0];
        assert_eq!((o.all.hits, o.all.page_hits), (0, 0));
    }

    #[test]
    fn cachesim_static_hot_set() {
        let rows = [9, 4, 7, 4, 1];
        let counts = [3, 2, 5, 1, 3];
        assert_eq!(hot_order(&rows, &counts).unwrap(), vec![7, 1, 4, 9]);
        assert_eq!(
            static_hot_set(&rows, &counts, 10, 35).unwrap(),
            vec![1, 4, 7]
        );
        assert_eq!(
            static_hot_set(&rows, &[0; 5], 10, 35).unwrap(),
            Vec::<u64>::new()
        );
        assert!(static_hot_set(&rows, &counts, 0, 35).is_err());
        let o = run(&[7, 7, 1, 2, 1], 10, 1, &[1], Policy::Static)[0];
        assert_eq!((o.all.hits, o.held), (2, 1));
    }

    #[test]
    fn cachesim_bad_batches() {
        let cfg = SimConfig {
            row_bytes: 8,
            page_bytes: 4096,
            budgets: &[64],
            policies: &[Policy::Lru],
            hot: HotCounts::InSample,
        };
        let t = [1, 2, 3];
        for off in [&[][..], &[1, 3], &[0, 2, 1, 3], &[0, 2]] {
            let e = simulate(&t, Batches::Offsets(off), &cfg).unwrap_err();
            assert!(e.to_string().contains("offset"), "{e}");
        }
        assert!(simulate(&t, Batches::Every(0), &cfg).is_err());
        assert!(simulate(&t, Batches::Offsets(&[0, 0, 3, 3]), &cfg).is_ok());
        assert!(simulate(&[u64::MAX / 4], Batches::Every(1), &cfg).is_err());
    }
}
