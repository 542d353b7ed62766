//! The agent protocol: the framed, versioned binary protocol spoken between the
//! in-sandbox agent (`gworker-agent`) and its supervisor on the host, over the
//! sandbox's stdin (host → agent) and stdout (agent → host) pipes.
//!
//! This crate owns the byte format and nothing else: no I/O policy, no
//! processes. Both ends must treat every frame from the other side as untrusted
//! input: [`decode`] never panics and refuses frames over [`MAX_FRAME`].
//!
//! # Frame
//! ```text
//! u32 LE  length of what follows (1 + body), at most MAX_FRAME
//! u8      message type
//! body    fields in order; integers little-endian; `bytes` = u32 LE length + bytes;
//!         `list` = u32 LE count + items; `data` = all remaining bytes of the frame
//! ```
//!
//! # Session
//! The agent speaks first with [`AgentMsg::Hello`] carrying [`PROTOCOL_VERSION`].
//! The host refuses an agent whose version it does not support. Process ids
//! (`pid`) are chosen by the host; they are not OS pids.
//!
//! # Flow control
//! Each output stream of each process starts with [`INITIAL_WINDOW`] bytes of
//! credit. The agent never sends more `Output` bytes for a stream than the
//! credit it holds; the host grants more with [`HostMsg::Credit`] once it has
//! stored what it received. While a stream has no credit the agent stops
//! reading the process's pipe, so a fast writer is slowed down, never dropped.

use std::io::{self, Read, Write};

/// Bumped on any incompatible change to the frame format or message set.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest frame (type + body) either side accepts.
pub const MAX_FRAME: usize = 1024 * 1024 + 64;
/// Largest `Output` payload the agent sends in one frame.
pub const MAX_OUTPUT_CHUNK: usize = 128 * 1024;
/// Credit each output stream starts with.
pub const INITIAL_WINDOW: u32 = 1024 * 1024;

/// A warm slot's volume mount inside the sandbox: the host binds a claim's
/// volumes under it as `0`, `1`, …, `HostMsg::Mount` names them, and the
/// agent detaches it before its first spawn.
pub const SLOT_VOLUMES_PATH: &str = "/.gworker/vols";

/// Spawn flag: create the working directory (and parents) if it is missing.
pub const SPAWN_MKDIR_CWD: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout = 1,
    Stderr = 2,
}

impl Stream {
    fn from_u8(v: u8) -> Result<Stream, DecodeError> {
        match v {
            1 => Ok(Stream::Stdout),
            2 => Ok(Stream::Stderr),
            _ => Err(DecodeError::Invalid("stream id")),
        }
    }
}

/// Why a spawn failed; lets the host map it to a precise API error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnErrorKind {
    /// The program does not exist (ENOENT on exec).
    NotFound = 1,
    /// The working directory does not exist.
    NoWorkdir = 2,
    /// The program exists but may not be executed (EACCES, ENOEXEC, ...).
    NotExecutable = 3,
    Other = 4,
}

impl SpawnErrorKind {
    fn from_u8(v: u8) -> SpawnErrorKind {
        match v {
            1 => SpawnErrorKind::NotFound,
            2 => SpawnErrorKind::NoWorkdir,
            3 => SpawnErrorKind::NotExecutable,
            _ => SpawnErrorKind::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawn {
    pub pid: u32,
    /// `SPAWN_*` bits.
    pub flags: u8,
    /// Program and arguments; `argv[0]` is looked up in `PATH` of `env` if it has no `/`.
    pub argv: Vec<Vec<u8>>,
    /// The complete environment, each entry `KEY=VALUE`.
    pub env: Vec<Vec<u8>>,
    /// Absolute working directory.
    pub cwd: Vec<u8>,
}

/// Messages from the host (supervisor) to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMsg {
    Spawn(Spawn),
    /// Bytes for the process's stdin.
    Stdin {
        pid: u32,
        data: Vec<u8>,
    },
    /// End of input: the agent closes the process's stdin.
    StdinClose {
        pid: u32,
    },
    /// Deliver `signo` to the process's process group.
    Signal {
        pid: u32,
        signo: i32,
    },
    /// The host stored `bytes` more of this stream: the agent may send that much more.
    Credit {
        pid: u32,
        stream: Stream,
        bytes: u32,
    },
    /// Liveness check; the agent answers `Pong` with the same `seq`.
    Ping {
        seq: u32,
    },
    /// Before a checkpoint: the host sends nothing after this until `Resume`;
    /// the agent writes every frame queued so far, then `Quiesced`, then holds
    /// further frames (processes keep running) until `Resume`. Both pipes are
    /// then at a frame boundary, so a checkpoint can be restored onto new pipes.
    Quiesce,
    /// After a checkpoint or restore (possibly on new pipes): carry on.
    Resume,
    /// Read these files (those that exist) once, in the background, so that
    /// the sandbox's first command finds them in gVisor's caches. Sent to
    /// warm-pool slots while they wait; nothing is answered.
    Prefetch {
        paths: Vec<Vec<u8>>,
    },
    /// Bind-mount each `sources[i]` (a directory) on `targets[i]` (made with
    /// its parents if missing); the agent answers `Mounted` with the same
    /// `seq`. Only before the first `Spawn`: at it, the agent detaches
    /// [`SLOT_VOLUMES_PATH`] and gives up its right to mount (CAP_SYS_ADMIN)
    /// before it starts any process.
    Mount {
        seq: u32,
        sources: Vec<Vec<u8>>,
        targets: Vec<Vec<u8>>,
    },
}

/// Messages from the agent to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMsg {
    Hello {
        version: u16,
        agent: String,
    },
    Spawned {
        pid: u32,
        os_pid: u32,
    },
    SpawnFailed {
        pid: u32,
        kind: SpawnErrorKind,
        message: String,
    },
    Output {
        pid: u32,
        stream: Stream,
        data: Vec<u8>,
    },
    /// The process closed this stream (or it was never open).
    Eof {
        pid: u32,
        stream: Stream,
    },
    /// The process ended: its exit status, or 128+N when killed by signal N.
    /// Sent after the `Spawned` for that pid; may come before its streams' `Eof`
    /// when a child of the process still holds them open.
    Exited {
        pid: u32,
        code: i32,
    },
    Pong {
        seq: u32,
    },
    /// A diagnostic line from the agent itself.
    Log {
        message: String,
    },
    /// Answer to `Quiesce`: the last frame before the agent holds its output.
    Quiesced,
    /// Answer to `Mount`: `error` is empty when every mount was made (when
    /// one fails, the ones before it stay).
    Mounted {
        seq: u32,
        error: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame too short")]
    Truncated,
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("unknown message type {0:#x}")]
    UnknownType(u8),
    #[error("invalid {0}")]
    Invalid(&'static str),
}

// Message type bytes.
const H_SPAWN: u8 = 0x02;
const H_STDIN: u8 = 0x03;
const H_STDIN_CLOSE: u8 = 0x04;
const H_SIGNAL: u8 = 0x05;
const H_CREDIT: u8 = 0x06;
const H_PING: u8 = 0x07;
const H_QUIESCE: u8 = 0x08;
const H_RESUME: u8 = 0x09;
const H_PREFETCH: u8 = 0x0a;
const H_MOUNT: u8 = 0x0b;
const A_HELLO: u8 = 0x81;
const A_SPAWNED: u8 = 0x82;
const A_SPAWN_FAILED: u8 = 0x83;
const A_OUTPUT: u8 = 0x84;
const A_EOF: u8 = 0x85;
const A_EXITED: u8 = 0x86;
const A_PONG: u8 = 0x87;
const A_LOG: u8 = 0x88;
const A_QUIESCED: u8 = 0x89;
const A_MOUNTED: u8 = 0x8a;

struct Enc<'a>(&'a mut Vec<u8>);

impl Enc<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    fn list(&mut self, v: &[Vec<u8>]) {
        self.u32(v.len() as u32);
        for item in v {
            self.bytes(item);
        }
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?).map_err(|_| DecodeError::Invalid("utf-8 string"))
    }
    fn list(&mut self) -> Result<Vec<Vec<u8>>, DecodeError> {
        let n = self.u32()? as usize;
        // Each item needs at least its 4-byte length: bound the allocation by the input.
        if n > self.0.len() / 4 {
            return Err(DecodeError::Truncated);
        }
        (0..n).map(|_| self.bytes()).collect()
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0).to_vec()
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Invalid("trailing bytes"))
        }
    }
}

/// Starts a frame in `out`; returns the position of the length field for [`finish`].
fn begin(out: &mut Vec<u8>, ty: u8) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, ty]);
    at
}

fn finish(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

impl HostMsg {
    /// Appends this message as one frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let at;
        {
            let ty = match self {
                HostMsg::Spawn(_) => H_SPAWN,
                HostMsg::Stdin { .. } => H_STDIN,
                HostMsg::StdinClose { .. } => H_STDIN_CLOSE,
                HostMsg::Signal { .. } => H_SIGNAL,
                HostMsg::Credit { .. } => H_CREDIT,
                HostMsg::Ping { .. } => H_PING,
                HostMsg::Quiesce => H_QUIESCE,
                HostMsg::Resume => H_RESUME,
                HostMsg::Prefetch { .. } => H_PREFETCH,
                HostMsg::Mount { .. } => H_MOUNT,
            };
            at = begin(out, ty);
        }
        let mut e = Enc(out);
        match self {
            HostMsg::Spawn(s) => {
                e.u32(s.pid);
                e.u8(s.flags);
                e.list(&s.argv);
                e.list(&s.env);
                e.bytes(&s.cwd);
            }
            HostMsg::Stdin { pid, data } => {
                e.u32(*pid);
                e.0.extend_from_slice(data);
            }
            HostMsg::StdinClose { pid } => e.u32(*pid),
            HostMsg::Signal { pid, signo } => {
                e.u32(*pid);
                e.i32(*signo);
            }
            HostMsg::Credit { pid, stream, bytes } => {
                e.u32(*pid);
                e.u8(*stream as u8);
                e.u32(*bytes);
            }
            HostMsg::Ping { seq } => e.u32(*seq),
            HostMsg::Quiesce | HostMsg::Resume => {}
            HostMsg::Prefetch { paths } => e.list(paths),
            HostMsg::Mount {
                seq,
                sources,
                targets,
            } => {
                e.u32(*seq);
                e.list(sources);
                e.list(targets);
            }
        }
        finish(out, at);
    }

    /// Decodes one frame body (type byte + body, without the length prefix).
    pub fn decode(frame: &[u8]) -> Result<HostMsg, DecodeError> {
        let mut d = Dec(frame);
        let msg = match d.u8()? {
            H_SPAWN => HostMsg::Spawn(Spawn {
                pid: d.u32()?,
                flags: d.u8()?,
                argv: d.list()?,
                env: d.list()?,
                cwd: d.bytes()?,
            }),
            H_STDIN => HostMsg::Stdin {
                pid: d.u32()?,
                data: d.rest(),
            },
            H_STDIN_CLOSE => HostMsg::StdinClose { pid: d.u32()? },
            H_SIGNAL => HostMsg::Signal {
                pid: d.u32()?,
                signo: d.i32()?,
            },
            H_CREDIT => HostMsg::Credit {
                pid: d.u32()?,
                stream: Stream::from_u8(d.u8()?)?,
                bytes: d.u32()?,
            },
            H_PING => HostMsg::Ping { seq: d.u32()? },
            H_QUIESCE => HostMsg::Quiesce,
            H_RESUME => HostMsg::Resume,
            H_PREFETCH => HostMsg::Prefetch { paths: d.list()? },
            H_MOUNT => {
                let (seq, sources, targets) = (d.u32()?, d.list()?, d.list()?);
                if sources.len() != targets.len() {
                    return Err(DecodeError::Invalid("mount lists differ in length"));
                }
                HostMsg::Mount {
                    seq,
                    sources,
                    targets,
                }
            }
            t => return Err(DecodeError::UnknownType(t)),
        };
        d.end()?;
        Ok(msg)
    }
}

impl AgentMsg {
    /// Appends this message as one frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let ty = match self {
            AgentMsg::Hello { .. } => A_HELLO,
            AgentMsg::Spawned { .. } => A_SPAWNED,
            AgentMsg::SpawnFailed { .. } => A_SPAWN_FAILED,
            AgentMsg::Output { .. } => A_OUTPUT,
            AgentMsg::Eof { .. } => A_EOF,
            AgentMsg::Exited { .. } => A_EXITED,
            AgentMsg::Pong { .. } => A_PONG,
            AgentMsg::Log { .. } => A_LOG,
            AgentMsg::Quiesced => A_QUIESCED,
            AgentMsg::Mounted { .. } => A_MOUNTED,
        };
        let at = begin(out, ty);
        let mut e = Enc(out);
        match self {
            AgentMsg::Hello { version, agent } => {
                e.u16(*version);
                e.bytes(agent.as_bytes());
            }
            AgentMsg::Spawned { pid, os_pid } => {
                e.u32(*pid);
                e.u32(*os_pid);
            }
            AgentMsg::SpawnFailed { pid, kind, message } => {
                e.u32(*pid);
                e.u8(*kind as u8);
                e.bytes(message.as_bytes());
            }
            AgentMsg::Output { pid, stream, data } => {
                e.u32(*pid);
                e.u8(*stream as u8);
                e.0.extend_from_slice(data);
            }
            AgentMsg::Eof { pid, stream } => {
                e.u32(*pid);
                e.u8(*stream as u8);
            }
            AgentMsg::Exited { pid, code } => {
                e.u32(*pid);
                e.i32(*code);
            }
            AgentMsg::Pong { seq } => e.u32(*seq),
            AgentMsg::Log { message } => e.bytes(message.as_bytes()),
            AgentMsg::Quiesced => {}
            AgentMsg::Mounted { seq, error } => {
                e.u32(*seq);
                e.bytes(error.as_bytes());
            }
        }
        finish(out, at);
    }

    /// Decodes one frame body (type byte + body, without the length prefix).
    pub fn decode(frame: &[u8]) -> Result<AgentMsg, DecodeError> {
        let mut d = Dec(frame);
        let msg = match d.u8()? {
            A_HELLO => AgentMsg::Hello {
                version: d.u16()?,
                agent: d.string()?,
            },
            A_SPAWNED => AgentMsg::Spawned {
                pid: d.u32()?,
                os_pid: d.u32()?,
            },
            A_SPAWN_FAILED => AgentMsg::SpawnFailed {
                pid: d.u32()?,
                kind: SpawnErrorKind::from_u8(d.u8()?),
                message: d.string()?,
            },
            A_OUTPUT => AgentMsg::Output {
                pid: d.u32()?,
                stream: Stream::from_u8(d.u8()?)?,
                data: d.rest(),
            },
            A_EOF => AgentMsg::Eof {
                pid: d.u32()?,
                stream: Stream::from_u8(d.u8()?)?,
            },
            A_EXITED => AgentMsg::Exited {
                pid: d.u32()?,
                code: d.i32()?,
            },
            A_PONG => AgentMsg::Pong { seq: d.u32()? },
            A_LOG => AgentMsg::Log {
                message: d.string()?,
            },
            A_QUIESCED => AgentMsg::Quiesced,
            A_MOUNTED => AgentMsg::Mounted {
                seq: d.u32()?,
                error: d.string()?,
            },
            t => return Err(DecodeError::UnknownType(t)),
        };
        d.end()?;
        Ok(msg)
    }
}

/// Reads one frame (type byte + body) into `buf` from a blocking reader.
/// Returns `Ok(false)` on a clean end of stream before any byte of a frame.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = frame_len(len)?;
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf)?;
    Ok(true)
}

/// Checks a frame's length prefix.
pub fn frame_len(prefix: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            DecodeError::TooLarge(len),
        ));
    }
    Ok(len)
}

/// Writes already-encoded frames and flushes.
pub fn write_frames(w: &mut impl Write, frames: &[u8]) -> io::Result<()> {
    w.write_all(frames)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_roundtrip(m: HostMsg) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        let mut r = &buf[..];
        let mut frame = Vec::new();
        assert!(read_frame(&mut r, &mut frame).unwrap());
        assert_eq!(HostMsg::decode(&frame).unwrap(), m);
        assert!(!read_frame(&mut r, &mut frame).unwrap());
    }

    fn agent_roundtrip(m: AgentMsg) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        let mut r = &buf[..];
        let mut frame = Vec::new();
        assert!(read_frame(&mut r, &mut frame).unwrap());
        assert_eq!(AgentMsg::decode(&frame).unwrap(), m);
    }

    #[test]
    fn every_host_message_round_trips() {
        host_roundtrip(HostMsg::Spawn(Spawn {
            pid: 7,
            flags: SPAWN_MKDIR_CWD,
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo \xff".to_vec()],
            env: vec![b"A=1".to_vec(), b"EMPTY=".to_vec()],
            cwd: b"/work".to_vec(),
        }));
        host_roundtrip(HostMsg::Stdin {
            pid: 1,
            data: vec![0, 1, 2, 255],
        });
        host_roundtrip(HostMsg::Stdin {
            pid: 1,
            data: vec![],
        });
        host_roundtrip(HostMsg::StdinClose { pid: 3 });
        host_roundtrip(HostMsg::Signal { pid: 3, signo: 9 });
        host_roundtrip(HostMsg::Credit {
            pid: 3,
            stream: Stream::Stderr,
            bytes: 65536,
        });
        host_roundtrip(HostMsg::Ping { seq: u32::MAX });
        host_roundtrip(HostMsg::Prefetch {
            paths: vec![b"/bin/sh".to_vec(), Vec::new()],
        });
        host_roundtrip(HostMsg::Mount {
            seq: 3,
            sources: vec![b"/.gworker/vols/0".to_vec()],
            targets: vec![b"/data".to_vec()],
        });
        host_roundtrip(HostMsg::Quiesce);
        host_roundtrip(HostMsg::Resume);
    }

    #[test]
    fn every_agent_message_round_trips() {
        agent_roundtrip(AgentMsg::Hello {
            version: PROTOCOL_VERSION,
            agent: "0.1.0".into(),
        });
        agent_roundtrip(AgentMsg::Spawned { pid: 1, os_pid: 42 });
        agent_roundtrip(AgentMsg::SpawnFailed {
            pid: 1,
            kind: SpawnErrorKind::NoWorkdir,
            message: "no such directory: /nope".into(),
        });
        agent_roundtrip(AgentMsg::Output {
            pid: 1,
            stream: Stream::Stdout,
            data: b"hi\n".to_vec(),
        });
        agent_roundtrip(AgentMsg::Eof {
            pid: 1,
            stream: Stream::Stdout,
        });
        agent_roundtrip(AgentMsg::Exited { pid: 1, code: 137 });
        agent_roundtrip(AgentMsg::Pong { seq: 5 });
        agent_roundtrip(AgentMsg::Log {
            message: "x".into(),
        });
        agent_roundtrip(AgentMsg::Quiesced);
        agent_roundtrip(AgentMsg::Mounted {
            seq: 3,
            error: "EPERM".into(),
        });
    }

    #[test]
    fn hostile_frames_are_refused_without_panic() {
        assert_eq!(HostMsg::decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(
            HostMsg::decode(&[0x7f]),
            Err(DecodeError::UnknownType(0x7f))
        );
        // A list claiming a billion items in a tiny frame.
        let mut f = vec![H_SPAWN, 1, 0, 0, 0, 0];
        f.extend_from_slice(&1_000_000_000u32.to_le_bytes());
        assert_eq!(HostMsg::decode(&f), Err(DecodeError::Truncated));
        // Bad stream id.
        assert_eq!(
            AgentMsg::decode(&[A_EOF, 1, 0, 0, 0, 9]),
            Err(DecodeError::Invalid("stream id"))
        );
        // Trailing garbage.
        assert_eq!(
            HostMsg::decode(&[H_PING, 1, 0, 0, 0, 0]),
            Err(DecodeError::Invalid("trailing bytes"))
        );
        // Oversized and zero length prefixes.
        let mut frame = Vec::new();
        let big = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(read_frame(&mut &big[..], &mut frame).is_err());
        assert!(read_frame(&mut &[0u8, 0, 0, 0][..], &mut frame).is_err());
        // Cut in the middle of the length or body.
        assert!(read_frame(&mut &[5u8, 0][..], &mut frame).is_err());
        assert!(read_frame(&mut &[5u8, 0, 0, 0, 1][..], &mut frame).is_err());
    }

    #[test]
    fn decode_never_panics_on_arbitrary_bytes() {
        // A cheap deterministic fuzz: every prefix of every message, and random bytes.
        let mut seed = 0x1234_5678u32;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let len = (seed % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 24)) as u8).collect();
            let _ = HostMsg::decode(&bytes);
            let _ = AgentMsg::decode(&bytes);
        }
    }
}
