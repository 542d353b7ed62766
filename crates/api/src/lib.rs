//! gworker-api (placeholder)
