//! The streaming EROFS image writer.
