//! What a presence member costs in memory on one node: the resident size
//! the process grows by while 200,000 members join one topic through the
//! public `Backend` API of the in-memory backend (docs/protocol-v1.md,
//! "Presence", "Memory"). Alone in its test binary, so that no other test
//! allocates meanwhile.

use switchboard::{Backend, ClientId, Departure, DuplicateIds, MemoryBackend, Topic};

/// This process's resident memory, in bytes.
fn vm_rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test]
async fn a_presence_member_costs_a_few_hundred_bytes_in_memory() {
    const N: usize = 200_000;
    let backend = MemoryBackend::new(DuplicateIds::Allow);
    let topic = Topic::new("room/1").expect("topic");
    // The IDs exist before the measurement: a member's cost is its entry,
    // not the ID its connection holds anyway.
    let ids: Vec<ClientId> = (0..N)
        .map(|i| ClientId::new(&format!("member-{i:06}")).expect("id"))
        .collect();
    let before = vm_rss();
    for id in &ids {
        backend.presence_join(&topic, id, None).await;
    }
    let grown = vm_rss().saturating_sub(before);
    let per_member = grown as f64 / N as f64;
    println!(
        "in-memory presence: {per_member:.0} bytes per member (RSS growth over {N} members of one topic, 13-byte IDs, no meta)"
    );
    assert_eq!(backend.presence_members(), N);
    assert!(
        per_member < 200.0,
        "{per_member:.0} bytes per member; docs/protocol-v1.md says about 75"
    );
    for id in &ids {
        backend.presence_leave(&topic, id, Departure::Now);
    }
    assert_eq!(backend.presence_members(), 0, "every member left");
}
