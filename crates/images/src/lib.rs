//! gworker-images (placeholder)
