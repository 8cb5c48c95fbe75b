//! Reading EROFS images without mounting them.
