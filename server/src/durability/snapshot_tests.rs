//! Snapshot tests (being written).
