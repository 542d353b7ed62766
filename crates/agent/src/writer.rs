//! The only owner of fd 1 (agent → host frames).
//!
//! Everyone else hands it encoded frames through a channel; it writes whatever
//! has queued up with one `writev`. Memory is bounded by the protocol, not here:
//! `Output` bytes in flight never exceed the credit the host granted, and every
//! other message is small and answers something the host sent.
//!
//! On a write error (the host went away) it signals `dead_fd` and stops; the
//! event loop then ends the sandbox.

use std::os::fd::RawFd;
use std::sync::mpsc::{channel, Receiver, Sender};

use gworker_proto::AgentMsg;

use crate::sys;

/// Most frames and bytes gathered into one `writev`.
const BATCH_FRAMES: usize = 256;
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// A cheap handle for sending frames to the host.
#[derive(Clone)]
pub struct Writer {
    tx: Sender<Vec<u8>>,
}

impl Writer {
    /// Starts the writer thread on `fd`; `dead_fd` (an eventfd) is signalled if
    /// writing fails.
    pub fn start(fd: RawFd, dead_fd: RawFd) -> std::io::Result<Writer> {
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("host-writer".into())
            .spawn(move || run(fd, rx, dead_fd))?;
        Ok(Writer { tx })
    }

    pub fn send(&self, msg: &AgentMsg) {
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        self.send_frame(frame);
    }

    /// Sends an already-encoded frame.
    pub fn send_frame(&self, frame: Vec<u8>) {
        // The receiver only goes away after a write error, when the event loop
        // is about to end the process anyway.
        let _ = self.tx.send(frame);
    }
}

fn run(fd: RawFd, rx: Receiver<Vec<u8>>, dead_fd: RawFd) {
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH_FRAMES);
    while let Ok(first) = rx.recv() {
        let mut bytes = first.len();
        batch.push(first);
        while batch.len() < BATCH_FRAMES && bytes < BATCH_BYTES {
            match rx.try_recv() {
                Ok(f) => {
                    bytes += f.len();
                    batch.push(f);
                }
                Err(_) => break,
            }
        }
        if let Err(e) = sys::write_all_vectored(fd, &batch) {
            eprintln!(
                "gworker-agent: writing to the host failed: {}",
                sys::errstr(&e)
            );
            sys::eventfd_signal(dead_fd);
            return;
        }
        batch.clear();
    }
}
