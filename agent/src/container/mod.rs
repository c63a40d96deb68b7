//! The container engine (placeholder, being written).
