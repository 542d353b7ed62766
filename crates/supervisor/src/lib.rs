//! gworker-supervisor (placeholder)
