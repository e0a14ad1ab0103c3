//! Several node-to-node messages in one `SPUBLISH`: what one flush of this
//! node has for one channel (the sends of many concurrent senders to one
//! node, the answers to one node) goes out as one Redis command and one
//! push, instead of one each.
//!
//! A batch is `*` followed by each message as its length in decimal, a
//! newline, and its bytes. A single message is sent as it is (it starts
//! with `{`, its JSON header), so a batch of one costs nothing extra.
//!
//! Order: the messages of one batch are handled in the order written, and
//! one node's batches reach another over one connection in the order
//! published, so what one sender sends one recipient still arrives in
//! order (and a sender has one send at a time in flight anyway).

use bytes::Bytes;

/// The first byte of a batch.
const MARK: u8 = b'*';

/// At most this many bytes of messages per batch: past it, the rest goes
/// in another `SPUBLISH` of the same pipeline (so a burst of large
/// payloads does not build one huge Redis bulk string).
pub(super) const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Groups `messages` by channel (in the order each channel first appears),
/// each group as one or more bodies (batches of at most
/// [`MAX_BATCH_BYTES`], or the message alone); `f` gets each body with
/// the positions in `messages` of what it carries.
pub(super) fn group(messages: &[(String, Vec<u8>)], mut f: impl FnMut(&str, Vec<u8>, &[usize])) {
    let mut channels: Vec<(&str, Vec<usize>)> = Vec::new();
    for (k, (channel, _)) in messages.iter().enumerate() {
        match channels.iter_mut().find(|(c, _)| *c == channel.as_str()) {
            Some((_, positions)) => positions.push(k),
            None => channels.push((channel, vec![k])),
        }
    }
    for (channel, positions) in channels {
        let mut start = 0;
        while start < positions.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < positions.len()
                && (end == start || bytes + messages[positions[end]].1.len() <= MAX_BATCH_BYTES)
            {
                bytes += messages[positions[end]].1.len();
                end += 1;
            }
            let part = &positions[start..end];
            let body = if part.len() == 1 {
                messages[part[0]].1.clone()
            } else {
                let mut body = Vec::with_capacity(1 + bytes + part.len() * 8);
                body.push(MARK);
                for &k in part {
                    let message = &messages[k].1;
                    body.extend_from_slice(message.len().to_string().as_bytes());
                    body.push(b'\n');
                    body.extend_from_slice(message);
                }
                body
            };
            f(channel, body, part);
            start = end;
        }
    }
}

/// The messages of `body`: itself when it is not a batch; `None` when it
/// is a malformed batch.
pub(super) fn split(body: Bytes) -> Option<Vec<Bytes>> {
    if body.first() != Some(&MARK) {
        return Some(vec![body]);
    }
    let mut parts = Vec::new();
    let mut at = 1;
    while at < body.len() {
        let newline = at + body[at..].iter().position(|&b| b == b'\n')?;
        let len: usize = std::str::from_utf8(&body[at..newline]).ok()?.parse().ok()?;
        let start = newline + 1;
        let end = start.checked_add(len).filter(|&end| end <= body.len())?;
        parts.push(body.slice(start..end));
        at = end;
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_splits_back_into_its_messages_in_order() {
        let messages = vec![
            ("a".to_owned(), b"{\"k\":1}\nx".to_vec()),
            ("b".to_owned(), b"{\"k\":2}\n".to_vec()),
            ("a".to_owned(), b"{\"k\":3}\n\n*7\n".to_vec()),
        ];
        let mut bodies = Vec::new();
        group(&messages, |channel, body, positions| {
            bodies.push((channel.to_owned(), body, positions.to_vec()));
        });
        assert_eq!(bodies.len(), 2);
        assert_eq!(bodies[0].0, "a");
        assert_eq!(bodies[0].2, vec![0, 2]);
        let parts = split(Bytes::from(bodies[0].1.clone())).expect("a batch");
        assert_eq!(parts, vec![&messages[0].1[..], &messages[2].1[..]]);
        // One message alone is sent as it is.
        assert_eq!(bodies[1].1, messages[1].1);
        let alone = split(Bytes::from(bodies[1].1.clone())).expect("one");
        assert_eq!(alone, vec![&messages[1].1[..]]);
    }

    #[test]
    fn large_messages_are_spread_over_several_batches() {
        let big = vec![b'x'; MAX_BATCH_BYTES / 2 + 1];
        let messages: Vec<_> = (0..3).map(|_| ("a".to_owned(), big.clone())).collect();
        let mut sizes = Vec::new();
        group(&messages, |_, _, positions| sizes.push(positions.len()));
        assert_eq!(sizes, vec![1, 1, 1]);
    }

    #[test]
    fn malformed_batches_are_refused() {
        for bad in [
            &b"*5\nab"[..],
            b"*x\nab",
            b"*2",
            b"*99999999999999999999999\n",
        ] {
            assert!(split(Bytes::from_static(bad)).is_none(), "{bad:?}");
        }
        assert_eq!(
            split(Bytes::from_static(b"*")).expect("empty"),
            Vec::<Bytes>::new()
        );
    }
}
