//! in-database tests (filled below)
