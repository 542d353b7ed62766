//! Measurements, not checks of correctness (those are in `agent.rs`). Ignored by
//! default; run in release to get meaningful figures:
//!
//! ```text
//! cargo test --release -p gworker-agent --test bench -- --ignored --nocapture --test-threads=1
//! ```
//! `GWORKER_AGENT_BIN` runs another agent binary (e.g. the static build).

mod common;

use std::time::{Duration, Instant};

use common::Agent;
use gworker_proto::{AgentMsg, HostMsg};

fn start() -> Agent {
    match std::env::var("GWORKER_AGENT_BIN") {
        Ok(bin) => Agent::start_bin(&bin),
        Err(_) => Agent::start(),
    }
}

/// 500 MB from one exec's stdout, credit granted as fast as bytes arrive.
#[test]
#[ignore]
fn throughput_500mb_stdout() {
    const TOTAL: u64 = 500_000_000;
    let mut a = start();
    let t = Instant::now();
    a.spawn(1, &["head", "-c", &TOTAL.to_string(), "/dev/zero"]);
    a.spawned(1);
    let (mut got, mut exited, mut eof) = (0u64, false, false);
    while !(exited && eof) {
        match a.recv() {
            AgentMsg::Output {
                pid: 1,
                stream,
                data,
            } => {
                got += data.len() as u64;
                a.send(&HostMsg::Credit {
                    pid: 1,
                    stream,
                    bytes: data.len() as u32,
                });
            }
            AgentMsg::Eof {
                pid: 1,
                stream: gworker_proto::Stream::Stdout,
            } => eof = true,
            AgentMsg::Exited { pid: 1, code } => {
                assert_eq!(code, 0);
                exited = true;
            }
            _ => {}
        }
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(got, TOTAL);
    let mbps = TOTAL as f64 / 1e6 / secs;
    println!("throughput: {TOTAL} bytes in {secs:.3} s = {mbps:.0} MB/s");
    assert!(mbps >= 200.0, "below 200 MB/s");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `true`: Spawn → Spawned → Exited (+ both Eofs), one after another.
#[test]
#[ignore]
fn exec_round_trip() {
    const N: u32 = 2000;
    let mut a = start();
    for pid in 0..50 {
        a.run(pid, &["/bin/true"]); // warm-up
    }
    let mut spawned = Vec::new();
    let mut done = Vec::new();
    for pid in 1000..1000 + N {
        let t = Instant::now();
        a.spawn(pid, &["/bin/true"]);
        a.spawned(pid);
        spawned.push(t.elapsed());
        a.wait_done(pid);
        done.push(t.elapsed());
        a.procs.remove(&pid);
    }
    for (name, v) in [
        ("spawn->Spawned", &mut spawned),
        ("spawn->Exited+Eofs", &mut done),
    ] {
        v.sort();
        let mean = v.iter().sum::<Duration>() / v.len() as u32;
        println!(
            "{name}: n={N} mean={mean:?} p50={:?} p99={:?} max={:?}",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[v.len() - 1]
        );
    }
    let t = Instant::now();
    for seq in 0..10_000 {
        a.send(&HostMsg::Ping { seq });
        a.expect_other(|m| matches!(m, AgentMsg::Pong { .. }));
    }
    println!("ping->pong: mean={:?}", t.elapsed() / 10_000);
}
