//! gworker-daemon (placeholder)
