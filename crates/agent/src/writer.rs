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

enum Item {
    Frame(Vec<u8>),
    /// Write everything before this, then `Quiesced`, then hold frames.
    Quiesce,
    /// Write what was held and carry on.
    Resume,
}

/// A cheap handle for sending frames to the host.
#[derive(Clone)]
pub struct Writer {
    tx: Sender<Item>,
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
        let _ = self.tx.send(Item::Frame(frame));
    }

    /// See `HostMsg::Quiesce`: frames sent after this are held until `resume`.
    pub fn quiesce(&self) {
        let _ = self.tx.send(Item::Quiesce);
    }

    pub fn resume(&self) {
        let _ = self.tx.send(Item::Resume);
    }
}

fn run(fd: RawFd, rx: Receiver<Item>, dead_fd: RawFd) {
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH_FRAMES);
    // Frames held while quiesced (bounded by credit, like everything else).
    let mut held: std::collections::VecDeque<Vec<u8>> = std::collections::VecDeque::new();
    let mut quiesced = false;
    loop {
        // Gather a batch: held frames first once resumed, then the queue.
        let mut bytes = 0;
        while !quiesced && batch.len() < BATCH_FRAMES && bytes < BATCH_BYTES {
            let Some(f) = held.pop_front() else { break };
            bytes += f.len();
            batch.push(f);
        }
        if batch.is_empty() {
            match rx.recv() {
                Ok(item) => handle_item(item, &mut batch, &mut held, &mut quiesced, &mut bytes),
                Err(_) => return,
            }
        }
        while batch.len() < BATCH_FRAMES && bytes < BATCH_BYTES {
            match rx.try_recv() {
                Ok(item) => handle_item(item, &mut batch, &mut held, &mut quiesced, &mut bytes),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
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

fn handle_item(
    item: Item,
    batch: &mut Vec<Vec<u8>>,
    held: &mut std::collections::VecDeque<Vec<u8>>,
    quiesced: &mut bool,
    bytes: &mut usize,
) {
    match item {
        // Behind held frames, to keep the order.
        Item::Frame(f) if *quiesced || !held.is_empty() => held.push_back(f),
        Item::Frame(f) => {
            *bytes += f.len();
            batch.push(f);
        }
        Item::Quiesce => {
            if !*quiesced {
                let mut f = Vec::new();
                AgentMsg::Quiesced.encode(&mut f);
                *bytes += f.len();
                batch.push(f);
                *quiesced = true;
            }
        }
        Item::Resume => *quiesced = false,
    }
}
