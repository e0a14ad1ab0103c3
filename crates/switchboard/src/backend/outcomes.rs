//! Each target's outcome of one send, one byte per target: what a
//! `switchboard.v1` ack reports, filled in by a backend that delivers at
//! once ([`Immediate::send_outcomes`](super::Immediate::send_outcomes)), or
//! read from a [`SendReport`]'s lists.
//!
//! Why not a [`SendReport`]: its five `Vec`s are up to five allocations per
//! send, and the ack writer turned them back into one state per target
//! anyway (callgrind, relay over v1: the report's lists and the boxed
//! future of `Backend::send` were ~700 instructions per message).

use smallvec::SmallVec;

use super::SendReport;

/// What happened to one target of a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetOutcome {
    /// At least one connection accepted the message.
    Delivered,
    /// Every connection refused it (queue full, or closing).
    Dropped,
    /// No live connection.
    Offline,
    /// Not confirmed: not reported by the backend, or a node that has the
    /// target did not answer.
    Unconfirmed,
}

/// The low two bits of a state: the outcome.
const OUTCOME: u8 = 0b11;
/// The third bit: the target's inbox kept the message.
const RETAINED: u8 = 0b100;

impl TargetOutcome {
    fn bits(self) -> u8 {
        match self {
            Self::Delivered => 0,
            Self::Dropped => 1,
            Self::Offline => 2,
            Self::Unconfirmed => 3,
        }
    }

    fn of_bits(bits: u8) -> Self {
        match bits & OUTCOME {
            0 => Self::Delivered,
            1 => Self::Dropped,
            2 => Self::Offline,
            _ => Self::Unconfirmed,
        }
    }
}

/// Targets kept on the stack; more spill to the heap (a send names 1 to a
/// few targets as a rule).
const INLINE: usize = 16;

/// Each target's outcome of one send, by index into the send's targets,
/// and how many connections the message was queued to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetOutcomes {
    states: SmallVec<[u8; INLINE]>,
    connections: usize,
    offline: usize,
    dropped: usize,
    unconfirmed: usize,
    retained: usize,
}

impl TargetOutcomes {
    /// `targets` targets, each unconfirmed until set: a target the backend
    /// does not report is never claimed delivered or offline.
    pub fn new(targets: usize) -> Self {
        Self {
            states: SmallVec::from_elem(TargetOutcome::Unconfirmed.bits(), targets),
            connections: 0,
            offline: 0,
            dropped: 0,
            unconfirmed: targets,
            retained: 0,
        }
    }

    /// The outcomes a report's lists give `targets` targets (indexes out of
    /// range are ignored).
    pub fn from_report(report: &SendReport, targets: usize) -> Self {
        let mut out = Self::new(targets);
        for (outcome, indexes) in [
            (TargetOutcome::Delivered, &report.delivered),
            (TargetOutcome::Offline, &report.offline),
            (TargetOutcome::Dropped, &report.dropped),
            (TargetOutcome::Unconfirmed, &report.unconfirmed),
        ] {
            for &i in indexes {
                out.set(i, outcome);
            }
        }
        for &i in &report.retained {
            out.set_retained(i);
        }
        out.connections = report.connections;
        out
    }

    /// Records target `i`'s outcome.
    pub fn set(&mut self, i: usize, outcome: TargetOutcome) {
        let Some(state) = self.states.get_mut(i) else {
            return;
        };
        match TargetOutcome::of_bits(*state) {
            TargetOutcome::Offline => self.offline -= 1,
            TargetOutcome::Dropped => self.dropped -= 1,
            TargetOutcome::Unconfirmed => self.unconfirmed -= 1,
            TargetOutcome::Delivered => {}
        }
        match outcome {
            TargetOutcome::Offline => self.offline += 1,
            TargetOutcome::Dropped => self.dropped += 1,
            TargetOutcome::Unconfirmed => self.unconfirmed += 1,
            TargetOutcome::Delivered => {}
        }
        *state = (*state & !OUTCOME) | outcome.bits();
    }

    /// Records that target `i`'s inbox kept the message.
    pub fn set_retained(&mut self, i: usize) {
        if let Some(state) = self.states.get_mut(i)
            && *state & RETAINED == 0
        {
            *state |= RETAINED;
            self.retained += 1;
        }
    }

    /// Adds `n` connections the message was queued to.
    pub fn add_connections(&mut self, n: usize) {
        self.connections += n;
    }

    /// Target `i`'s outcome (`Unconfirmed` for an index out of range).
    pub fn outcome(&self, i: usize) -> TargetOutcome {
        self.states
            .get(i)
            .map_or(TargetOutcome::Unconfirmed, |&s| TargetOutcome::of_bits(s))
    }

    /// Whether target `i`'s inbox kept the message.
    pub fn retained(&self, i: usize) -> bool {
        self.states.get(i).is_some_and(|&s| s & RETAINED != 0)
    }

    /// How many targets there are.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// Connections the message was queued to, over all targets.
    pub fn connections(&self) -> usize {
        self.connections
    }

    /// Targets delivered.
    pub fn delivered(&self) -> usize {
        self.len() - self.offline - self.dropped - self.unconfirmed
    }

    /// Targets whose inbox kept the message.
    pub fn retained_count(&self) -> usize {
        self.retained
    }

    /// Targets offline.
    pub fn offline(&self) -> usize {
        self.offline
    }

    /// Targets whose every connection refused the message.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// Targets unconfirmed.
    pub fn unconfirmed(&self) -> usize {
        self.unconfirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_and_the_outcomes_set_one_by_one_agree() {
        let report = SendReport {
            delivered: vec![0, 3],
            offline: vec![1],
            dropped: vec![2],
            unconfirmed: vec![],
            retained: vec![1, 3],
            connections: 4,
        };
        // Target 4 is in no list: unconfirmed.
        let from_report = TargetOutcomes::from_report(&report, 5);
        let mut by_hand = TargetOutcomes::new(5);
        by_hand.set(0, TargetOutcome::Delivered);
        by_hand.set(1, TargetOutcome::Offline);
        by_hand.set_retained(1);
        by_hand.set(2, TargetOutcome::Dropped);
        by_hand.set(3, TargetOutcome::Delivered);
        by_hand.set_retained(3);
        by_hand.add_connections(4);
        assert_eq!(from_report, by_hand);
        assert_eq!(
            (0..5).map(|i| by_hand.outcome(i)).collect::<Vec<_>>(),
            [
                TargetOutcome::Delivered,
                TargetOutcome::Offline,
                TargetOutcome::Dropped,
                TargetOutcome::Delivered,
                TargetOutcome::Unconfirmed
            ]
        );
        assert!(by_hand.retained(1) && by_hand.retained(3) && !by_hand.retained(0));
        by_hand.set_retained(3);
        assert_eq!((by_hand.delivered(), by_hand.retained_count()), (2, 2));
        assert_eq!(
            (
                by_hand.offline(),
                by_hand.dropped(),
                by_hand.unconfirmed(),
                by_hand.connections()
            ),
            (1, 1, 1, 4)
        );
        // Out of range: ignored, and reads as unconfirmed.
        by_hand.set(9, TargetOutcome::Delivered);
        assert_eq!(by_hand.outcome(9), TargetOutcome::Unconfirmed);
    }

    #[test]
    fn more_targets_than_fit_inline_spill_to_the_heap() {
        let mut many = TargetOutcomes::new(40);
        for i in 0..40 {
            many.set(i, TargetOutcome::Offline);
        }
        assert_eq!(
            (many.len(), many.offline(), many.unconfirmed()),
            (40, 40, 0)
        );
    }
}
