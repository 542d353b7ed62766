//! gworker-engine (placeholder)
