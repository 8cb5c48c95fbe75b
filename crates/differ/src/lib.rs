//! The Diff service logic (being written).
