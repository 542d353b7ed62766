//! gworker-runtime (placeholder)
