//! The relay on `/ws?id=N`: delivery by ID, in the exact wire format.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn delivers_the_payload_json_to_every_connection_of_each_target() {
    let server = TestServer::start().await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut two_a = server.connect("/ws?id=2").await;
    let mut two_b = server.connect("/ws?id=2").await;
    let mut three = server.connect("/ws?id=3").await;
    let mut bystander = server.connect("/ws?id=4").await;
    server
        .eventually("five connections registered", |hub| {
            hub.live_connections() == 5
        })
        .await;

    send_text(
        &mut sender,
        r#"{"targets":[2,3],"payload":{"hello":"world","n":[1,2]}}"#,
    )
    .await;

    for client in [&mut two_a, &mut two_b, &mut three] {
        assert_eq!(recv_text(client).await, r#"{"hello":"world","n":[1,2]}"#);
    }
    assert_silent(&mut bystander, Duration::from_millis(200)).await;
    assert_silent(&mut sender, Duration::from_millis(50)).await;
}
