//! Networking: each core's accept loop and the connections it serves.

pub mod connection;
pub mod listener;
pub mod ring;
