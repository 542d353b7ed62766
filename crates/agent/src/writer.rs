//! The only way to fd 1 (agent → host frames).
//!
//! Frames queue up and a thread writes whatever has gathered with one
//! `writev`, so that the event loop does not wait on a full pipe with large
//! output while it could be reading the processes'. A small frame sent while
//! nothing is queued or being written goes out at once from the caller's
//! thread instead (the caller then waits if the pipe is nearly full, until
//! the supervisor, which always reads it, has made room):
//! under gVisor, handing it to the thread (a futex wake, a context switch in
//! the sentry) costs more than the write, and `Spawned`, `Exited` and a short
//! output are exactly what a caller is waiting for. The order of frames is the
//! order of the calls either way: a direct write happens only when nothing
//! sent earlier is still pending, and holds the lock while it writes. Between
//! [`Writer::gather`] and [`Writer::flush`] (one turn of the event loop) such
//! frames are gathered and written together: a process's Eof, Eof and Exited
//! cost one write and wake the supervisor once.
//!
//! Memory is bounded by the protocol, not here: `Output` bytes in flight never
//! exceed the credit the host granted, and every other message is small and
//! answers something the host sent.
//!
//! On a write error (the host went away) `dead_fd` is signalled and nothing
//! more is written; the event loop then ends the sandbox.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use gworker_proto::AgentMsg;

use crate::sys;

/// Most frames and bytes gathered into one `writev`.
const BATCH_FRAMES: usize = 256;
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Largest frame written directly by the sender (a quarter of a default pipe).
const DIRECT_MAX: usize = 16 * 1024;
/// Most bytes gathered for one direct write.
const GATHER_MAX: usize = 64 * 1024;

struct State {
    queue: VecDeque<Vec<u8>>,
    /// Small frames to write directly at `flush`.
    gathered: Vec<Vec<u8>>,
    gathering: bool,
    /// Frames sent while quiesced, written after `resume`.
    held: VecDeque<Vec<u8>>,
    quiesced: bool,
    /// The thread is writing a batch taken from `queue`.
    busy: bool,
    failed: bool,
}

struct Inner {
    fd: RawFd,
    dead_fd: RawFd,
    st: Mutex<State>,
    work: Condvar,
}

/// A cheap handle for sending frames to the host.
#[derive(Clone)]
pub struct Writer {
    inner: Arc<Inner>,
}

impl Writer {
    /// Starts the writer thread on `fd`; `dead_fd` (an eventfd) is signalled if
    /// writing fails.
    pub fn start(fd: RawFd, dead_fd: RawFd) -> std::io::Result<Writer> {
        let inner = Arc::new(Inner {
            fd,
            dead_fd,
            st: Mutex::new(State {
                queue: VecDeque::new(),
                gathered: Vec::new(),
                gathering: false,
                held: VecDeque::new(),
                quiesced: false,
                busy: false,
                failed: false,
            }),
            work: Condvar::new(),
        });
        let thread = inner.clone();
        sys::thread("host-writer", move || run(&thread))?;
        Ok(Writer { inner })
    }

    pub fn send(&self, msg: &AgentMsg) {
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        self.send_frame(frame);
    }

    /// Sends an already-encoded frame.
    pub fn send_frame(&self, frame: Vec<u8>) {
        let mut st = self.inner.lock();
        if st.failed {
            return;
        }
        if st.quiesced {
            st.held.push_back(frame);
            return;
        }
        let direct = !st.busy
            && st.queue.is_empty()
            && frame.len() <= DIRECT_MAX
            && st.gathered.iter().map(Vec::len).sum::<usize>() + frame.len() <= GATHER_MAX;
        if direct && st.gathering {
            st.gathered.push(frame);
        } else if direct {
            self.inner.write_now(&mut st, std::slice::from_ref(&frame));
        } else {
            st.queue_gathered();
            st.queue.push_back(frame);
            self.inner.work.notify_one();
        }
    }

    /// Gathers small frames until [`flush`](Self::flush).
    pub fn gather(&self) {
        self.inner.lock().gathering = true;
    }

    /// Writes what was gathered, and stops gathering.
    pub fn flush(&self) {
        let mut st = self.inner.lock();
        st.gathering = false;
        if st.gathered.is_empty() {
            return;
        }
        if !st.busy && st.queue.is_empty() {
            let frames = std::mem::take(&mut st.gathered);
            self.inner.write_now(&mut st, &frames);
        } else {
            st.queue_gathered();
            self.inner.work.notify_one();
        }
    }

    /// See `HostMsg::Quiesce`: everything sent before is written, then
    /// `Quiesced`; frames sent after this are held until `resume`.
    pub fn quiesce(&self) {
        let mut st = self.inner.lock();
        if !st.quiesced {
            st.queue_gathered();
            let mut f = Vec::new();
            AgentMsg::Quiesced.encode(&mut f);
            st.queue.push_back(f);
            st.quiesced = true;
            self.inner.work.notify_one();
        }
    }

    pub fn resume(&self) {
        let mut st = self.inner.lock();
        st.quiesced = false;
        let held = std::mem::take(&mut st.held);
        st.queue.extend(held);
        self.inner.work.notify_one();
    }
}

impl State {
    /// Queues the gathered frames for the thread (something must follow them).
    fn queue_gathered(&mut self) {
        let gathered = std::mem::take(&mut self.gathered);
        self.queue.extend(gathered);
    }
}

impl Inner {
    /// Writes from the caller's thread, the lock held (nothing else is pending).
    fn write_now(&self, st: &mut State, frames: &[Vec<u8>]) {
        if let Err(e) = sys::write_all_vectored(self.fd, frames) {
            self.fail(st, e);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, st: &mut State, e: std::io::Error) {
        eprintln!(
            "gworker-agent: writing to the host failed: {}",
            sys::errstr(&e)
        );
        st.failed = true;
        st.queue.clear();
        st.gathered.clear();
        st.held.clear();
        sys::eventfd_signal(self.dead_fd);
    }
}

fn run(inner: &Inner) {
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH_FRAMES);
    let mut st = inner.lock();
    loop {
        while st.queue.is_empty() && !st.failed {
            st = inner.work.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.failed {
            return;
        }
        let mut bytes = 0;
        while batch.len() < BATCH_FRAMES && bytes < BATCH_BYTES {
            let Some(f) = st.queue.pop_front() else { break };
            bytes += f.len();
            batch.push(f);
        }
        st.busy = true;
        drop(st);
        let r = sys::write_all_vectored(inner.fd, &batch);
        batch.clear();
        st = inner.lock();
        st.busy = false;
        if let Err(e) = r {
            inner.fail(&mut st, e);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gworker_proto::Stream;
    use std::os::fd::{AsRawFd, OwnedFd};

    fn encode(m: &AgentMsg) -> Vec<u8> {
        let mut f = Vec::new();
        m.encode(&mut f);
        f
    }

    /// Reads `want` bytes on another thread (the frames do not fit in a pipe).
    fn reader(r: OwnedFd, want: usize) -> std::thread::JoinHandle<Vec<AgentMsg>> {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 1 << 20];
            while got.len() < want {
                let n = sys::read(r.as_raw_fd(), &mut buf).unwrap();
                assert!(n > 0, "the writer's pipe closed early");
                got.extend_from_slice(&buf[..n]);
            }
            let mut out = Vec::new();
            let mut bytes = &got[..];
            while !bytes.is_empty() {
                let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
                out.push(AgentMsg::decode(&bytes[4..4 + len]).unwrap());
                bytes = &bytes[4 + len..];
            }
            out
        })
    }

    fn readable(fd: RawFd) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    fn output(i: u32, len: usize) -> AgentMsg {
        AgentMsg::Output {
            pid: i,
            stream: Stream::Stdout,
            data: vec![i as u8; len],
        }
    }

    /// Small frames (written directly or gathered) and large ones (queued for
    /// the thread) reach the host in the order they were sent.
    #[test]
    fn frames_keep_their_order_direct_or_queued() {
        let (r, w) = sys::pipe().unwrap();
        let dead = sys::eventfd().unwrap();
        let writer = Writer::start(w.as_raw_fd(), dead.as_raw_fd()).unwrap();
        let sent: Vec<AgentMsg> = (0..300u32)
            .map(|i| output(i, if i % 7 == 0 { 100 * 1024 } else { 10 }))
            .collect();
        let total = sent.iter().map(|m| encode(m).len()).sum();
        let got = reader(r, total);
        for (i, m) in sent.iter().enumerate() {
            match i % 10 {
                0 => writer.gather(),
                6 => writer.flush(),
                _ => {}
            }
            writer.send(m);
        }
        writer.flush();
        assert_eq!(got.join().unwrap(), sent);
    }

    /// Frames sent while quiesced come after `Quiesced`, and only once resumed.
    #[test]
    fn quiesce_holds_later_frames_until_resume() {
        let (r, w) = sys::pipe().unwrap();
        let dead = sys::eventfd().unwrap();
        let writer = Writer::start(w.as_raw_fd(), dead.as_raw_fd()).unwrap();
        let before = output(1, 10);
        let after = output(2, 10);
        writer.send(&before);
        writer.quiesce();
        writer.send(&after);
        let first = encode(&before).len() + encode(&AgentMsg::Quiesced).len();
        assert_eq!(
            reader(r.try_clone().unwrap(), first).join().unwrap(),
            vec![before, AgentMsg::Quiesced]
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!readable(r.as_raw_fd()), "a held frame was written");
        writer.resume();
        assert_eq!(reader(r, encode(&after).len()).join().unwrap(), vec![after]);
    }
}
