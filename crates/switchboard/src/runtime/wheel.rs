//! A coarse timer wheel shared by every connection of a hub: the keepalive
//! deadlines (ping when silent for `ping_interval`, close when a ping is not
//! answered within `pong_timeout`) without a `tokio::time::Sleep` in each
//! connection.
//!
//! Why: a `Sleep` is 112 B stored inline in every connection's task, plus
//! its pinned reference, and it put the connection future over the 408 B
//! that a 512 B tokio task cell holds (see `connection_future_sizes` and
//! docs/design.md). A connection here keeps a [`Timer`] of 16 B: the tick it
//! waits for and where its waker sits in the wheel.
//!
//! How: time is cut into ticks of [`TimerWheel::tick`] since the wheel was
//! made. A ring of [`SLOTS`] slots holds, for each tick, the wakers of the
//! connections whose deadline falls in it; one task per wheel sleeps until
//! the first non-empty slot's tick has passed, advances the fired count
//! (an atomic every connection reads without a lock) and wakes the slot's
//! wakers. A deadline further than the ring reaches is parked in the
//! ring's last slot; the connection, woken early, sees it is not due yet
//! and arms again. A deadline fires between 0 and one tick late.
//!
//! Re-arming is lazy: a connection that hears from its client does not touch
//! the wheel; when its timer fires it computes the real deadline from when
//! it last heard and arms again if that is later. So the wheel sees about
//! one arm per connection per `ping_interval`, plus one at open and one
//! cancel at close.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Slots in the ring. With the default tick of 250 ms the ring reaches
/// 64 s ahead, past the default `ping_interval` (25 s) and `pong_timeout`
/// (10 s), so a default deadline is armed once. Each slot is an empty `Vec`
/// pair (48 B) until used: 12 KiB per hub.
pub(crate) const SLOTS: usize = 256;

/// The coarsest tick: a keepalive deadline fires at most this late.
/// 250 ms is 2.5% of the default 10 s `pong_timeout` and 1% of the 25 s
/// `ping_interval`; the wheel task then wakes at most 4 times a second.
/// (1 s would make a short, test-sized pong timeout fire far too late.)
pub(crate) const MAX_TICK: Duration = Duration::from_millis(250);

/// The finest tick, for very short keepalive settings (tests): below 1 ms
/// the wheel task would be woken more often than it saves.
pub(crate) const MIN_TICK: Duration = Duration::from_millis(1);

/// No tick: the timer is not armed.
const UNARMED: u64 = u64::MAX;
/// No place in a slot: the timer has no waker in the wheel.
const UNREGISTERED: u32 = u32::MAX;

/// One connection's timer: the tick it waits for and where its waker sits.
/// Kept inline in the connection task (16 B); see [`TimerWheel::poll`].
#[derive(Debug)]
pub(crate) struct Timer {
    /// The deadline's tick.
    tick: u64,
    /// The waker's place in its slot.
    index: u32,
    /// How many ticks before `tick` the waker is parked (a deadline beyond
    /// the ring's reach waits in its farthest slot, then moves on).
    parked: u32,
}

impl Default for Timer {
    fn default() -> Self {
        Self {
            tick: UNARMED,
            index: UNREGISTERED,
            parked: 0,
        }
    }
}

impl Timer {
    /// Whether a deadline is set.
    pub(crate) fn is_armed(&self) -> bool {
        self.tick != UNARMED
    }

    /// The tick of the slot the waker is in.
    fn slot_tick(&self) -> u64 {
        self.tick - u64::from(self.parked)
    }
}

/// The wakers waiting for one tick. `wakers[i]` is `None` once cancelled;
/// its index is then in `free` for the next arm.
#[derive(Default)]
struct Slot {
    wakers: Vec<Option<Waker>>,
    free: Vec<u32>,
}

impl Slot {
    fn live(&self) -> usize {
        self.wakers.len() - self.free.len()
    }
}

struct State {
    slots: Box<[Slot]>,
    /// Wakers in all slots.
    live: usize,
    /// The tick the task sleeps until, so that an arm for an earlier one
    /// wakes it (`None`: it waits for an arm).
    task_wakes_at: Option<u64>,
    /// The task; started on first use, and again if the runtime it ran on
    /// has gone (a hub outliving a test's runtime).
    task: Option<tokio::task::JoinHandle<()>>,
}

/// See the module documentation.
pub(crate) struct TimerWheel {
    origin: Instant,
    tick: Duration,
    /// Ticks fired: every slot for a tick below this has been woken and
    /// emptied. Written under `state`'s lock, read without it.
    fired: AtomicU64,
    state: Mutex<State>,
    /// Wakes the task for an earlier tick, or to end when the wheel is
    /// dropped. Shared with the task, which must not keep the wheel alive.
    wake: Arc<Notify>,
}

impl TimerWheel {
    /// A wheel for the keepalive settings: its tick suits the shorter of
    /// the two (ignoring a zero, which turns pings off).
    pub(crate) fn for_keepalive(ping_interval: Duration, pong_timeout: Duration) -> Self {
        let shortest = [ping_interval, pong_timeout]
            .into_iter()
            .filter(|d| !d.is_zero())
            .min()
            .unwrap_or(MAX_TICK * 8);
        Self::new(shortest)
    }

    /// A wheel whose tick suits deadlines of `shortest` (the shortest
    /// keepalive setting in force): an eighth of it, between [`MIN_TICK`]
    /// and [`MAX_TICK`], so that a deadline is late by at most 12.5%.
    pub(crate) fn new(shortest: Duration) -> Self {
        let tick = (shortest / 8).clamp(MIN_TICK, MAX_TICK);
        Self {
            origin: Instant::now(),
            tick,
            fired: AtomicU64::new(0),
            state: Mutex::new(State {
                slots: (0..SLOTS).map(|_| Slot::default()).collect(),
                live: 0,
                task_wakes_at: None,
                task: None,
            }),
            wake: Arc::new(Notify::new()),
        }
    }

    /// The wheel's tick: how late a deadline may fire.
    #[cfg(test)]
    pub(crate) fn tick(&self) -> Duration {
        self.tick
    }

    /// The first tick that starts at or after `at`: a deadline fires once
    /// that tick is fired, so never early.
    fn tick_at_or_after(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.origin).as_nanos();
        let tick = self.tick.as_nanos();
        u64::try_from(since.div_ceil(tick)).unwrap_or(UNARMED - 1)
    }

    /// When tick `tick` has passed (its slot may fire).
    fn instant_of(&self, tick: u64) -> Instant {
        let nanos = u128::from(tick) * self.tick.as_nanos();
        self.origin + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Sets `timer` to fire at `at` (at the next tick if `at` has passed),
    /// dropping an earlier setting. Its waker is registered on the next
    /// [`poll`](Self::poll).
    pub(crate) fn set(&self, timer: &mut Timer, at: Instant) {
        self.cancel(timer);
        timer.tick = self.tick_at_or_after(at);
    }

    /// Disarms `timer` and takes its waker out of the wheel.
    pub(crate) fn cancel(&self, timer: &mut Timer) {
        let old = std::mem::take(timer);
        if old.index == UNREGISTERED {
            return;
        }
        let slot_tick = old.slot_tick();
        let mut state = self.state.lock();
        // A slot that fired since took the waker already, and the ring
        // slot may hold a later tick's wakers at the same index now.
        if slot_tick < self.fired.load(Ordering::Relaxed) {
            return;
        }
        let slot = &mut state.slots[slot_of(slot_tick)];
        let Some(waker) = slot.wakers.get_mut(old.index as usize) else {
            return;
        };
        if waker.take().is_none() {
            return;
        }
        slot.free.push(old.index);
        if slot.live() == 0 {
            // Give the space back: a burst of connections armed in one tick
            // should not keep its `Vec`s.
            *slot = Slot::default();
        }
        state.live -= 1;
    }

    /// `Ready` once `timer`'s deadline has passed (the timer is then
    /// disarmed): never early, at most one tick late. Otherwise makes sure
    /// the task's waker is in the wheel and returns `Pending`. An unarmed
    /// timer is always `Pending`. Takes no lock unless it registers the
    /// waker: once per arm, and again for a deadline beyond the ring.
    ///
    /// The waker is the one of the poll that registered; a later poll with
    /// another waker is not seen (checking would take the lock on every
    /// poll). Fine for a connection, which is always polled by its own
    /// task (`handler::session::spawn`); a caller polling through a
    /// combinator that changes wakers must set the timer again.
    pub(crate) fn poll(self: &Arc<Self>, timer: &mut Timer, cx: &mut Context<'_>) -> Poll<()> {
        if timer.tick == UNARMED {
            return Poll::Pending;
        }
        let fired = self.fired.load(Ordering::Acquire);
        if timer.tick < fired {
            // The wheel dropped the waker with the slot.
            *timer = Timer::default();
            return Poll::Ready(());
        }
        if timer.index != UNREGISTERED {
            if timer.slot_tick() >= fired {
                return Poll::Pending;
            }
            // Parked short of the deadline, and that slot fired: move on.
            timer.index = UNREGISTERED;
        }
        self.register(timer, cx.waker())
    }

    fn register(self: &Arc<Self>, timer: &mut Timer, waker: &Waker) -> Poll<()> {
        let mut state = self.state.lock();
        let fired = self.fired.load(Ordering::Relaxed);
        if timer.tick < fired {
            *timer = Timer::default();
            return Poll::Ready(());
        }
        // Beyond the ring: park at its farthest tick. A deadline more than
        // `u32::MAX` ticks away (49 days at the finest tick) is brought in
        // to that distance: it fires early rather than overflow.
        let slot_tick = timer.tick.min(fired + SLOTS as u64 - 1);
        timer.parked = u32::try_from(timer.tick - slot_tick).unwrap_or(u32::MAX);
        timer.tick = slot_tick + u64::from(timer.parked);
        let slot = &mut state.slots[slot_of(slot_tick)];
        let waker = Some(waker.clone());
        timer.index = match slot.free.pop() {
            Some(index) => {
                slot.wakers[index as usize] = waker;
                index
            }
            None => {
                slot.wakers.push(waker);
                u32::try_from(slot.wakers.len() - 1).unwrap_or(UNREGISTERED)
            }
        };
        state.live += 1;
        let earlier = state.task_wakes_at.is_none_or(|at| slot_tick < at);
        if earlier {
            state.task_wakes_at = Some(slot_tick);
        }
        if state.task.as_ref().is_none_or(|task| task.is_finished()) {
            let task = run(Arc::downgrade(self), Arc::clone(&self.wake));
            state.task = Some(tokio::spawn(task));
        } else if earlier {
            drop(state);
            self.wake.notify_one();
        }
        Poll::Pending
    }

    /// Fires every slot whose tick has passed at `now`; returns their
    /// wakers and the next tick to wake at, if any waker is left.
    fn advance(&self, now: Instant) -> (Vec<Waker>, Option<u64>) {
        let mut state = self.state.lock();
        // Ticks below `through` have passed.
        let through = {
            let since = now.saturating_duration_since(self.origin).as_nanos();
            u64::try_from(since / self.tick.as_nanos() + 1).unwrap_or(UNARMED)
        };
        let mut fired = self.fired.load(Ordering::Relaxed);
        let mut due = Vec::new();
        // At most one turn of the ring: later ticks share those slots and
        // nothing is parked beyond the ring.
        let last = through.min(fired + SLOTS as u64);
        while fired < last {
            let slot = std::mem::take(&mut state.slots[slot_of(fired)]);
            let woken = slot.live();
            state.live -= woken;
            due.extend(slot.wakers.into_iter().flatten());
            fired += 1;
        }
        let fired = fired.max(through);
        self.fired.store(fired, Ordering::Release);
        let next = if state.live == 0 {
            None
        } else {
            (fired..fired + SLOTS as u64).find(|&tick| state.slots[slot_of(tick)].live() > 0)
        };
        state.task_wakes_at = next;
        (due, next)
    }
}

fn slot_of(tick: u64) -> usize {
    (tick % SLOTS as u64) as usize
}

impl Drop for TimerWheel {
    fn drop(&mut self) {
        // Wakes the task so that it sees the wheel is gone and ends.
        self.wake.notify_one();
    }
}

/// The wheel's task: sleeps until the first armed tick has passed, fires
/// the slots due, and again; waits for an arm while nothing is armed.
async fn run(wheel: Weak<TimerWheel>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(wheel) = wheel.upgrade() else {
                return;
            };
            let (due, next) = wheel.advance(Instant::now());
            for waker in due {
                waker.wake();
            }
            next.map(|tick| wheel.instant_of(tick))
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    /// Waits for `timer` and returns when it fired.
    async fn fired(wheel: &Arc<TimerWheel>, timer: &mut Timer) -> Instant {
        poll_fn(|cx| wheel.poll(timer, cx)).await;
        Instant::now()
    }

    fn live(wheel: &TimerWheel) -> usize {
        wheel.state.lock().live
    }

    /// A deadline fires at or after its time, at most a tick (and the
    /// scheduler's latency) later, and leaves no waker behind.
    #[tokio::test]
    async fn a_timer_fires_at_its_deadline_never_before() {
        let wheel = Arc::new(TimerWheel::new(Duration::from_millis(80)));
        assert_eq!(wheel.tick(), Duration::from_millis(10));
        for delay in [0, 5, 30, 75] {
            let mut timer = Timer::default();
            let at = Instant::now() + Duration::from_millis(delay);
            wheel.set(&mut timer, at);
            let when = tokio::time::timeout(Duration::from_secs(5), fired(&wheel, &mut timer))
                .await
                .expect("the timer fires");
            assert!(when >= at, "fired {:?} early", at - when);
            assert!(
                when - at < wheel.tick() + Duration::from_millis(200),
                "fired {:?} late",
                when - at
            );
            assert!(!timer.is_armed());
            assert_eq!(live(&wheel), 0);
        }
    }

    /// A deadline beyond the ring's reach (256 ticks) is parked in its
    /// farthest slot and moved on when that fires: still never early.
    #[tokio::test]
    async fn a_deadline_beyond_the_ring_fires_on_time() {
        let wheel = Arc::new(TimerWheel::new(Duration::from_millis(8)));
        assert_eq!(wheel.tick(), MIN_TICK);
        let mut timer = Timer::default();
        let at = Instant::now() + MIN_TICK * (SLOTS as u32 + 150);
        wheel.set(&mut timer, at);
        let when = tokio::time::timeout(Duration::from_secs(5), fired(&wheel, &mut timer))
            .await
            .expect("the timer fires");
        assert!(when >= at, "fired {:?} early", at - when);
        assert_eq!(live(&wheel), 0);
    }

    /// A cancelled timer's waker leaves the wheel at once, and a timer set
    /// again waits for its new deadline only.
    #[tokio::test]
    async fn cancel_and_set_again_move_the_waker() {
        let wheel = Arc::new(TimerWheel::new(Duration::from_secs(8)));
        let mut timer = Timer::default();
        wheel.set(&mut timer, Instant::now() + Duration::from_secs(60));
        let waiting = tokio::time::timeout(Duration::from_millis(20), fired(&wheel, &mut timer));
        assert!(waiting.await.is_err(), "a minute away: not fired");
        assert_eq!(live(&wheel), 1);
        wheel.cancel(&mut timer);
        assert!(!timer.is_armed());
        assert_eq!(live(&wheel), 0);

        let mut others: Vec<Timer> = (0..3).map(|_| Timer::default()).collect();
        for other in &mut others {
            wheel.set(other, Instant::now() + Duration::from_secs(60));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(wheel.poll(other, &mut cx).is_pending());
        }
        assert_eq!(live(&wheel), 3);
        let at = Instant::now() + Duration::from_millis(300);
        wheel.set(&mut others[1], at);
        assert_eq!(live(&wheel), 2, "set again: the old waker left");
        let when = tokio::time::timeout(Duration::from_secs(5), fired(&wheel, &mut others[1]))
            .await
            .expect("the timer set again fires");
        assert!(when >= at);
        for other in &mut others {
            wheel.cancel(other);
        }
        assert_eq!(live(&wheel), 0);
    }
}
