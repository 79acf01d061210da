//! The event hub behind `Jobs.Watch`: job state changes in log order, kept in a bounded ring so
//! a client can resume from a position, and broadcast live to every watcher.
//!
//! Positions are (log index of the entry, place within the entry). Every replica applies the
//! same entries and so numbers the same events the same way: a client may resume on any node.
//! **Invariant:** the hub holds every event after `floor`, in order, without gaps; a resume from
//! before `floor` is refused (the caller re-reads state with Get/List) rather than silently
//! skipping events.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use exactly_core::JobEvent;
use tokio::sync::broadcast;

/// Events kept for resuming watchers.
pub const WATCH_BUFFER_EVENTS_MAX: usize = 65_536;
/// Events a live watcher may fall behind before it must catch up from the ring.
pub const WATCH_LIVE_EVENTS_MAX: usize = 4_096;
/// Watch streams one node serves at once.
pub const WATCHERS_MAX: usize = 1_024;

/// Where an event sits: (log index, place within the entry).
pub type Position = (u64, u32);

/// What a subscriber starts with: the retained backlog, then the live feed.
pub type Subscription = (Vec<Arc<Positioned>>, broadcast::Receiver<Arc<Positioned>>);

#[derive(Clone, Debug)]
pub struct Positioned {
    pub position: Position,
    pub event: JobEvent,
}

/// A resume position older than what the hub retains.
#[derive(Debug, thiserror::Error)]
#[error("events after {after:?} are no longer retained on this node (it keeps events after {floor:?}); re-read the job state and watch from now")]
pub struct TooOld {
    pub after: Position,
    pub floor: Position,
}

struct Ring {
    events: VecDeque<Arc<Positioned>>,
    /// Every event after this position is in `events` (or later).
    floor: Position,
    /// The position of the last event published.
    last: Position,
}

pub struct EventHub {
    ring: Mutex<Ring>,
    live: broadcast::Sender<Arc<Positioned>>,
    /// Open watch streams: in all (at most [`WATCHERS_MAX`]) and per token name.
    watchers: Mutex<Watchers>,
}

#[derive(Default)]
struct Watchers {
    all: usize,
    by_token: std::collections::HashMap<String, usize>,
}

/// One admitted watch stream; dropping it frees its place.
pub struct WatcherSlot {
    hub: Arc<EventHub>,
    token: Option<String>,
}

impl Drop for WatcherSlot {
    fn drop(&mut self) {
        let mut w = self.hub.watchers();
        w.all = w.all.saturating_sub(1);
        if let Some(token) = &self.token {
            if let Some(n) = w.by_token.get_mut(token) {
                *n -= 1;
                if *n == 0 {
                    w.by_token.remove(token);
                }
            }
        }
    }
}

/// Why a watch stream was not admitted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WatchRefused {
    #[error("this node already serves {WATCHERS_MAX} watch streams")]
    Node,
    #[error("token {0:?} already has {1} watch streams open on this node (limits.watch-streams-per-token-max)")]
    Token(String, usize),
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new()
    }
}

impl EventHub {
    pub fn new() -> Self {
        let (live, _) = broadcast::channel(WATCH_LIVE_EVENTS_MAX);
        Self {
            ring: Mutex::new(Ring {
                events: VecDeque::new(),
                floor: (0, u32::MAX),
                last: (0, u32::MAX),
            }),
            live,
            watchers: Default::default(),
        }
    }

    fn watchers(&self) -> std::sync::MutexGuard<'_, Watchers> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one more watch stream, for `token` (its name; `None` without tokens) at most
    /// `per_token_max` of them, and at most [`WATCHERS_MAX`] on this node in all.
    pub fn admit_watcher(
        self: &Arc<Self>,
        token: Option<&str>,
        per_token_max: usize,
    ) -> Result<WatcherSlot, WatchRefused> {
        let mut w = self.watchers();
        if w.all >= WATCHERS_MAX {
            return Err(WatchRefused::Node);
        }
        if let Some(token) = token {
            let open = w.by_token.get(token).copied().unwrap_or(0);
            if open >= per_token_max {
                return Err(WatchRefused::Token(token.to_string(), open));
            }
            *w.by_token.entry(token.to_string()).or_default() += 1;
        }
        w.all += 1;
        Ok(WatcherSlot {
            hub: self.clone(),
            token: token.map(str::to_string),
        })
    }

    /// Open watch streams on this node.
    pub fn watchers_open(&self) -> usize {
        self.watchers().all
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state machine starts from `index` (its snapshot): events of later entries will be
    /// published as they are (re-)applied; earlier ones are not retained.
    pub fn start_after(&self, index: u64) {
        let mut ring = self.ring();
        if ring.events.is_empty() {
            ring.floor = (index, u32::MAX);
            ring.last = (index, u32::MAX);
        }
    }

    /// Publishes the events of applied entries, in log order. One entry's events always come
    /// in one call (apply hands over whole entries), so an entry at or below the last one seen
    /// is a replay and is ignored.
    pub fn publish(&self, events: Vec<(u64, JobEvent)>) {
        let mut ring = self.ring();
        let mut open: Option<u64> = None;
        for (index, event) in events {
            let seq = if open == Some(index) {
                ring.last.1.wrapping_add(1)
            } else if index > ring.last.0 {
                open = Some(index);
                0
            } else {
                continue;
            };
            let position = (index, seq);
            ring.last = position;
            let item = Arc::new(Positioned { position, event });
            ring.events.push_back(item.clone());
            if ring.events.len() > WATCH_BUFFER_EVENTS_MAX {
                if let Some(old) = ring.events.pop_front() {
                    ring.floor = old.position;
                }
            }
            // No receivers is fine: nobody watches.
            let _ = self.live.send(item);
        }
    }

    /// A snapshot replaced the state up to `index`: events before it were never seen here, so
    /// resumes from before it are refused.
    pub fn reset_to(&self, index: u64) {
        let mut ring = self.ring();
        if (index, u32::MAX) > ring.last {
            ring.events.clear();
            ring.floor = (index, u32::MAX);
            ring.last = (index, u32::MAX);
        }
    }

    /// The retained events after `after` (none if `after` is `None`, which means "from now"),
    /// and a receiver for what comes next, taken under one lock so nothing falls between them.
    pub fn subscribe(&self, after: Option<Position>) -> Result<Subscription, TooOld> {
        let ring = self.ring();
        let receiver = self.live.subscribe();
        let Some(mut after) = after else {
            return Ok((Vec::new(), receiver));
        };
        // Log index 0 holds no entry, so no event: any place in it is "from the very start".
        if after.0 == 0 {
            after = (0, u32::MAX);
        }
        if after < ring.floor {
            return Err(TooOld {
                after,
                floor: ring.floor,
            });
        }
        let backlog = ring
            .events
            .iter()
            .filter(|e| e.position > after)
            .cloned()
            .collect();
        Ok((backlog, receiver))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_core::JobStatus;

    /// One token cannot take every watch slot: it gets its own share, others keep theirs, and a
    /// closed stream frees its place.
    #[test]
    fn watch_streams_are_bounded_per_token_and_in_all() {
        let hub = Arc::new(EventHub::new());
        let a: Vec<_> = (0..3)
            .map(|_| hub.admit_watcher(Some("a"), 3).unwrap())
            .collect();
        assert_eq!(
            hub.admit_watcher(Some("a"), 3).err(),
            Some(WatchRefused::Token("a".into(), 3))
        );
        let b = hub.admit_watcher(Some("b"), 3).unwrap();
        assert_eq!(hub.watchers_open(), 4);
        drop(a);
        drop(b);
        assert_eq!(hub.watchers_open(), 0);
        assert!(hub.watchers().by_token.is_empty());
        let many: Vec<_> = (0..WATCHERS_MAX)
            .map(|_| hub.admit_watcher(None, 0).unwrap())
            .collect();
        assert_eq!(
            hub.admit_watcher(Some("c"), 9).err(),
            Some(WatchRefused::Node)
        );
        drop(many);
        assert!(hub.admit_watcher(Some("c"), 9).is_ok());
    }

    fn event(job: u64) -> JobEvent {
        JobEvent {
            job,
            queue: "q".into(),
            status: JobStatus::Pending,
            attempt: 0,
            token: 0,
            node: None,
            at_ms: 1,
        }
    }

    /// Events get (index, seq) positions; a resume returns exactly those after the position and
    /// then live ones; re-published entries are ignored.
    #[test]
    fn positions_resume_and_replays() {
        let hub = EventHub::new();
        hub.start_after(4);
        hub.publish(vec![(5, event(1)), (5, event(2)), (7, event(3))]);
        let (backlog, mut live) = hub.subscribe(Some((5, 0))).expect("retained");
        let got: Vec<Position> = backlog.iter().map(|e| e.position).collect();
        assert_eq!(got, vec![(5, 1), (7, 0)]);
        // A replay of entry 7 is ignored; entry 8 is new.
        hub.publish(vec![(7, event(3)), (8, event(4))]);
        let next = live.try_recv().expect("live event");
        assert_eq!(next.position, (8, 0));
        assert!(live.try_recv().is_err());
        // From the start of what this node saw: everything.
        let (all, _) = hub.subscribe(Some((4, u32::MAX))).expect("retained");
        assert_eq!(all.len(), 4);
        // Older than the floor: refused, not silently partial.
        assert!(hub.subscribe(Some((3, 0))).is_err());
        assert!(hub.subscribe(Some((0, 0))).is_err());
    }

    /// A node that has seen the log from its first entry serves a watch from the very start,
    /// however the start is written (`0:0` or `0:<any>`): index 0 holds no events.
    #[test]
    fn the_very_start_is_served_while_nothing_was_dropped() {
        let hub = EventHub::default();
        hub.start_after(0);
        hub.publish(vec![(1, event(1)), (2, event(2))]);
        for after in [(0, 0), (0, 7), (0, u32::MAX)] {
            let (all, _) = hub.subscribe(Some(after)).expect("from the start");
            assert_eq!(all.len(), 2, "{after:?}");
        }
    }

    /// The ring is bounded: past WATCH_BUFFER_EVENTS_MAX the oldest go, and the floor moves.
    #[test]
    fn the_ring_is_bounded_and_the_floor_moves() {
        let hub = EventHub::new();
        hub.start_after(0);
        let n = WATCH_BUFFER_EVENTS_MAX as u64 + 10;
        hub.publish((1..=n).map(|i| (i, event(i))).collect());
        assert!(hub.subscribe(Some((5, 0))).is_err());
        let (backlog, _) = hub.subscribe(Some((10, 0))).expect("retained");
        assert_eq!(backlog.len(), WATCH_BUFFER_EVENTS_MAX);
        assert_eq!(backlog[0].position, (11, 0));
    }
}
