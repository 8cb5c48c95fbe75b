//! Applies OCI layer tars onto directories (being written).
