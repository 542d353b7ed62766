//! `gworker-agent`: the root process (PID 1) of every sandbox.
//!
//! It speaks the `gworker-proto` protocol with the host supervisor over fd 0
//! (host → agent) and fd 1 (agent → host), starts the sandbox's commands as its
//! own children, streams their output under the host's flow control, and reaps
//! every process in the sandbox. Its own diagnostics go to fd 2.
//!
//! Built fully static (`-C target-feature=+crt-static`) so that it runs in any
//! image; it must therefore avoid anything that needs NSS (user/host lookups).

mod agent;
mod spawn;
mod sys;
mod writer;

fn main() {
    agent::run()
}
