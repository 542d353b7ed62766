//! `gworker-agent`: the root process (PID 1) of every sandbox.
//!
//! It speaks the `gworker-proto` protocol with the host supervisor over fd 0
//! (host → agent) and fd 1 (agent → host), starts the sandbox's commands as its
//! own children, streams their output under the host's flow control, and reaps
//! every process in the sandbox. Its own diagnostics go to fd 2.
//!
//! Built fully static (`-C target-feature=+crt-static`) so that it runs in any
//! image; it must therefore avoid anything that needs NSS (user/host lookups).
//!
//! `no_main`: the C `main` below is the entry point, so Rust's runtime start-up
//! does not run. Under gVisor each of its system calls is a round trip
//! through the sentry, on the path of every sandbox's boot: it reads
//! `/proc/self/maps` to place the main thread's stack guard, installs SIGSEGV
//! and SIGBUS handlers on an alternate stack (one more per thread), and polls
//! fds 0-2. The agent needs none of it; it ignores SIGPIPE itself.
#![cfg_attr(not(test), no_main)]

mod agent;
mod spawn;
mod sys;
mod writer;

#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    agent::run()
}

/// The test harness brings its own `main`; this keeps the code it calls live.
#[cfg(test)]
fn main() {
    agent::run()
}
