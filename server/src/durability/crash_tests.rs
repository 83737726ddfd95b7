//! Crash-image tests (being written).
