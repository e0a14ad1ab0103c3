//! [`Conns`]: one client ID's live connections, as the in-memory registry
//! keeps them.

use std::ops::Deref;

use crate::runtime::mailbox::ConnRef;

/// One client ID's live connections on this node, oldest first: one kept
/// inline, more in a `Vec`.
///
/// Why not a plain `Vec`: almost every ID has one connection, and a `Vec`'s
/// first push allocates room for four (64 B, an 80 B heap chunk) for every
/// ID registered; inline, one connection costs nothing beyond the entry.
#[derive(Default)]
pub(crate) enum Conns {
    #[default]
    None,
    One(ConnRef),
    /// Two or more.
    Many(Vec<ConnRef>),
}

impl Deref for Conns {
    type Target = [ConnRef];

    fn deref(&self) -> &[ConnRef] {
        match self {
            Self::None => &[],
            Self::One(conn) => std::slice::from_ref(conn),
            Self::Many(conns) => conns,
        }
    }
}

impl Conns {
    /// Adds `conn` as the newest.
    pub(crate) fn push(&mut self, conn: ConnRef) {
        *self = match std::mem::take(self) {
            Self::None => Self::One(conn),
            Self::One(first) => Self::Many(vec![first, conn]),
            Self::Many(mut conns) => {
                conns.push(conn);
                Self::Many(conns)
            }
        };
    }

    /// Removes and returns the connection at `at` (0 is the oldest), if any.
    pub(crate) fn remove(&mut self, at: usize) -> Option<ConnRef> {
        match std::mem::take(self) {
            Self::None => None,
            Self::One(conn) if at == 0 => Some(conn),
            Self::One(conn) => {
                *self = Self::One(conn);
                None
            }
            Self::Many(mut conns) => {
                let gone = (at < conns.len()).then(|| conns.remove(at));
                *self = match conns.len() {
                    0 => Self::None,
                    1 => conns.pop().map_or(Self::None, Self::One),
                    _ => Self::Many(conns),
                };
                gone
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::runtime::mailbox::Mailbox;

    fn conn() -> ConnRef {
        let mailbox: Arc<Mailbox<()>> = Mailbox::new(1, 1, false);
        ConnRef::new(mailbox)
    }

    fn ids(conns: &Conns) -> Vec<u64> {
        conns.iter().map(|c| c.id().0).collect()
    }

    /// Oldest first through every shape: none, one inline, many, and back.
    #[test]
    fn push_and_remove_keep_the_order() {
        let mut conns = Conns::default();
        assert!(conns.is_empty());
        assert!(conns.remove(0).is_none());
        let (a, b, c) = (conn(), conn(), conn());
        let (ia, ib, ic) = (a.id().0, b.id().0, c.id().0);
        conns.push(a);
        assert!(matches!(conns, Conns::One(_)));
        assert!(conns.remove(1).is_none(), "no second connection");
        assert_eq!(ids(&conns), [ia]);
        conns.push(b);
        conns.push(c);
        assert_eq!(ids(&conns), [ia, ib, ic]);
        assert_eq!(conns.remove(1).map(|c| c.id().0), Some(ib));
        assert!(conns.remove(5).is_none());
        assert_eq!(ids(&conns), [ia, ic]);
        assert_eq!(conns.remove(0).map(|c| c.id().0), Some(ia));
        assert!(matches!(conns, Conns::One(_)), "back inline");
        assert_eq!(conns.remove(0).map(|c| c.id().0), Some(ic));
        assert!(matches!(conns, Conns::None));
    }
}
