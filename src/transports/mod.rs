//! Transports: the objects that own a connected fd and move bytes between it and a
//! protocol without going through Python glue.

pub mod stream;
