//! Directory changes to OCI layer tars (being written).
