//! A small safe wrapper over the zlib C API of `libz-rs-sys` (zlib-rs): raw deflate
//! inflation with `Z_BLOCK` stops, `inflatePrime` and `inflateSetDictionary`, which the
//! zran-style checkpoints need and the stable Rust API of zlib-rs does not offer.

use std::ffi::c_int;

use libz_rs_sys::{
    inflate, inflateEnd, inflateInit2_, inflatePrime, inflateReset, inflateSetDictionary, z_stream, zlibVersion,
    Z_BUF_ERROR, Z_OK, Z_STREAM_END,
};

pub(crate) use libz_rs_sys::{Z_BLOCK, Z_NO_FLUSH};

/// `data_type` bit: inflate stopped at a block boundary (before a block header).
pub(crate) const DT_AT_BOUNDARY: c_int = 128;
/// `data_type` bit: the block just finished was the last one of the deflate stream.
pub(crate) const DT_LAST_BLOCK: c_int = 64;
/// `data_type` bits: number of unused bits held from input bytes already consumed.
pub(crate) const DT_BITS: c_int = 63;

/// What one `inflate` call did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    /// Input bytes consumed.
    pub consumed: usize,
    /// Output bytes written.
    pub produced: usize,
    /// The deflate stream ended (final block done).
    pub end: bool,
    /// `data_type` after the call.
    pub data_type: c_int,
}

/// Raw deflate (no zlib/gzip wrapper) inflater with a 32 KiB window.
pub(crate) struct RawInflate {
    // Boxed: zlib's state points back at its `z_stream`, which must not move.
    strm: Box<z_stream>,
}

// SAFETY: the stream owns its state exclusively; nothing in it is tied to a thread.
unsafe impl Send for RawInflate {}

impl RawInflate {
    /// A raw inflater (window bits -15).
    pub(crate) fn new() -> Result<Self, &'static str> {
        let mut strm = Box::new(z_stream::default());
        // SAFETY: `strm` is a valid, default-initialized stream at a stable address;
        // the version and size are the library's own.
        let ret = unsafe { inflateInit2_(&mut *strm, -15, zlibVersion(), std::mem::size_of::<z_stream>() as c_int) };
        if ret != Z_OK {
            return Err("inflateInit2 failed");
        }
        Ok(RawInflate { strm })
    }

    /// Back to the start of a raw deflate stream (window emptied).
    pub(crate) fn reset(&mut self) -> Result<(), &'static str> {
        // SAFETY: the stream was initialized by `new`.
        match unsafe { inflateReset(&mut *self.strm) } {
            Z_OK => Ok(()),
            _ => Err("inflateReset failed"),
        }
    }

    /// Inserts `bits` (1..=7) bits of `value` into the bit buffer (a checkpoint's
    /// partial byte).
    pub(crate) fn prime(&mut self, bits: u8, value: u8) -> Result<(), &'static str> {
        if bits == 0 {
            return Ok(());
        }
        if bits > 7 {
            return Err("inflatePrime: more than 7 bits");
        }
        // SAFETY: the stream was initialized by `new`.
        match unsafe { inflatePrime(&mut *self.strm, c_int::from(bits), c_int::from(value)) } {
            Z_OK => Ok(()),
            _ => Err("inflatePrime failed"),
        }
    }

    /// Sets the sliding window (the output preceding the checkpoint).
    pub(crate) fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), &'static str> {
        if dict.is_empty() {
            return Ok(());
        }
        if dict.len() > 32768 {
            return Err("window larger than 32 KiB");
        }
        // SAFETY: the stream was initialized by `new`; `dict` is valid for its length.
        match unsafe { inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as u32) } {
            Z_OK => Ok(()),
            _ => Err("inflateSetDictionary failed"),
        }
    }

    /// One `inflate` call from `input` into `output` with `flush` (`Z_NO_FLUSH` or
    /// `Z_BLOCK`). `Err` carries zlib's message for a corrupt stream.
    pub(crate) fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: c_int) -> Result<Step, String> {
        // Keep the lengths in zlib's 32-bit counters (our buffers are far smaller).
        let in_len = input.len().min(u32::MAX as usize);
        let out_len = output.len().min(u32::MAX as usize);
        let s = &mut *self.strm;
        s.next_in = input.as_ptr();
        s.avail_in = in_len as u32;
        s.next_out = output.as_mut_ptr();
        s.avail_out = out_len as u32;
        // SAFETY: the stream was initialized by `new`; next_in/next_out point into the
        // borrowed slices for avail_in/avail_out bytes, valid for the whole call. zlib
        // keeps no pointer into them past the call that we later dereference: every
        // call sets both again.
        let ret = unsafe { inflate(s, flush) };
        let consumed = in_len - s.avail_in as usize;
        let produced = out_len - s.avail_out as usize;
        let data_type = s.data_type;
        s.next_in = std::ptr::null();
        s.avail_in = 0;
        s.next_out = std::ptr::null_mut();
        s.avail_out = 0;
        match ret {
            Z_OK | Z_BUF_ERROR => Ok(Step {
                consumed,
                produced,
                end: false,
                data_type,
            }),
            Z_STREAM_END => Ok(Step {
                consumed,
                produced,
                end: true,
                data_type,
            }),
            _ => Err(self.message(ret)),
        }
    }

    fn message(&self, ret: c_int) -> String {
        let msg = self.strm.msg;
        if msg.is_null() {
            format!("inflate error {ret}")
        } else {
            // SAFETY: zlib sets `msg` to a static NUL-terminated string.
            unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy().into_owned()
        }
    }
}

impl Drop for RawInflate {
    fn drop(&mut self) {
        // SAFETY: the stream was initialized by `new` and is ended once.
        unsafe {
            inflateEnd(&mut *self.strm);
        }
    }
}

/// CRC-32 (gzip's) of `data`, continuing from `crc`.
pub(crate) fn crc32(crc: u32, data: &[u8]) -> u32 {
    // SAFETY: the pointer is valid for `data.len()` bytes.
    unsafe { libz_rs_sys::crc32_z(crc.into(), data.as_ptr(), data.len()) as u32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_known_value() {
        assert_eq!(crc32(0, b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(crc32(0, b"1234"), b"56789"), 0xcbf4_3926);
    }

    #[test]
    fn prime_rejects_too_many_bits() {
        let mut z = RawInflate::new().unwrap();
        assert!(z.prime(8, 0).is_err());
        assert!(z.set_dictionary(&[0; 40000]).is_err());
    }
}
