//! Garbage thrown at the server.

use super::*;

// ---------------------------------------------------------------------------------------------
// Garbage

/// xorshift64*: deterministic noise without a dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_handshakes_and_requests_never_disturb_a_good_client() {
    let t = TestServer::start(SIZE).await;
    let mut good = RawClient::open(&t.sock, "disk").await;
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);

    for round in 0..60u64 {
        if round % 2 == 0 {
            // Handshake noise: a real option header with random option/length/data, or junk.
            let mut c = RawClient::connect(&t.sock).await;
            let option = (noise.next() % 16) as u32;
            let len = noise.next() % 64;
            let mut out = proto::IHAVEOPT.to_be_bytes().to_vec();
            out.extend_from_slice(&option.to_be_bytes());
            out.extend_from_slice(&(len as u32).to_be_bytes());
            let junk = (noise.next() % 80) as usize;
            out.extend(noise.bytes(junk));
            let _ = c.s.write_all(&out).await;
        } else {
            // Transmission noise: well-framed headers with random fields and payload.
            let mut c = RawClient::open(&t.sock, if round % 3 == 0 { "ro" } else { "disk" }).await;
            let mut out = Vec::new();
            for _ in 0..8 {
                let req = proto::RequestHeader {
                    flags: (noise.next() % 64) as u16,
                    command: (noise.next() % 10) as u16,
                    cookie: noise.next(),
                    offset: noise.next() % (2 * SIZE),
                    length: noise.next() % (SIZE / 4),
                };
                out.extend(proto::encode_request(HeaderMode::Structured, &req));
                if req.command == proto::CMD_WRITE {
                    out.extend(noise.bytes(req.length as usize));
                }
            }
            let _ = c.s.write_all(&out).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    assert_alive(&mut good).await;
    let mut late = RawClient::open(&t.sock, "disk").await;
    assert_alive(&mut late).await;
    for _ in 0..100 {
        if t.server.export_clients("disk") + t.server.export_clients("ro") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        t.server.export_clients("disk") + t.server.export_clients("ro"),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_is_notified_only_after_running_backend_calls_finish() {
    let t = TestServer::start(SIZE).await;
    t.backend.hold_writes(true);
    let mut c = RawClient::open(&t.sock, "disk").await;
    c.send_request(proto::CMD_WRITE, 0, 1, 0, 512, &[3; 512])
        .await;
    for _ in 0..100 {
        if t.backend.waiting_writes() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(t.backend.waiting_writes(), 1);

    let mut gone = t.server.remove_export("disk", true).unwrap();
    assert!(c.closed_within(SHORT).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let early = gone.try_recv().is_ok();
    t.backend.hold_writes(false);

    assert!(!early, "removal notified while a write was still running");
    tokio::time::timeout(SHORT, gone).await.unwrap().unwrap();
}
