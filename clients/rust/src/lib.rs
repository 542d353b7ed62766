//! gworker-client (placeholder)
