//! One-pass conversion of OCI layers into EROFS images.
