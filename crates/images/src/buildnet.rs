//! Network access for build steps that need it (`apt_install`,
//! `pip_install`): a network namespace of the daemon's making with a veth
//! and NAT (`gworker_runtime::net`), for the length of one step. The policy
//! is the default one of sandboxes: the internet, but never the host, its
//! networks or other sandboxes; DNS through the host's resolvers.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use gworker_runtime::net::{NetPolicy, SandboxNet};

/// A build step's network; removed when dropped.
pub(crate) struct BuildNet {
    net: SandboxNet,
    state_dir: PathBuf,
}

impl BuildNet {
    pub(crate) fn setup(id: &str, state_dir: &Path) -> io::Result<BuildNet> {
        fs::create_dir_all(state_dir)?;
        let policy = NetPolicy::Internet {
            extra_allowed: Vec::new(),
        };
        let net = SandboxNet::setup(id, &policy, state_dir).map_err(io::Error::other)?;
        Ok(BuildNet {
            net,
            state_dir: state_dir.to_path_buf(),
        })
    }

    pub(crate) fn netns_path(&self) -> PathBuf {
        self.net.netns_path()
    }

    pub(crate) fn resolv_conf(&self) -> String {
        SandboxNet::resolv_conf()
    }
}

impl Drop for BuildNet {
    fn drop(&mut self) {
        if let Err(e) = SandboxNet::teardown(&self.net.id, &self.state_dir) {
            tracing::warn!(id = %self.net.id, error = %e, "cannot remove a build step's network");
        }
    }
}

/// Program and leading arguments that run runsc with a network.
pub(crate) fn runsc_wrapper() -> Vec<String> {
    gworker_runtime::net::runsc_wrapper()
}

/// Removes networks of build steps a crashed daemon left (those recorded in
/// this store's own state directory; other daemons' are not touched).
pub(crate) fn cleanup_stale(state_dir: &Path) {
    for id in gworker_runtime::net::recorded_ids(state_dir) {
        tracing::info!(id, "removing a build step's network left by a crash");
        if let Err(err) = SandboxNet::teardown(&id, state_dir) {
            tracing::warn!(id, error = %err, "cannot remove a build step's network");
        }
    }
}
