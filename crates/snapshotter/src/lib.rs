//! The snapshot store (being written).
