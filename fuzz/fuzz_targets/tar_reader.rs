//! The tar reader on arbitrary bytes: never a panic, entries come in stream order, and
//! every entry's body is exactly as long as its header says (or the stream is refused).
#![no_main]

use std::io::Read;

use layer_convert::tar::TarReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut tar = TarReader::new(data);
    let mut last = None;
    // Alternate reading bodies and letting the reader skip them: both paths are used.
    let mut read_body = data.len() % 2 == 0;
    loop {
        let e = match tar.next_entry() {
            Ok(Some(e)) => e,
            Ok(None) | Err(_) => break,
        };
        assert!(e.kind.is_some(), "entry without a type");
        assert!(last.is_none_or(|l| e.offset > l), "entries out of order");
        assert!(e.offset < data.len() as u64);
        // A body can only be as long as what is left of the input.
        if e.size > data.len() as u64 {
            // The reader must refuse it when asked for the body, not hand out bytes.
            let mut sink = Vec::new();
            let r = tar.body().take(e.size).read_to_end(&mut sink);
            assert!(r.is_err() || (sink.len() as u64) < e.size);
            break;
        }
        if read_body {
            let mut body = vec![0u8; e.size as usize];
            if tar.body().read_exact(&mut body).is_err() {
                break;
            }
            tar.body_done();
        }
        read_body = !read_body;
        last = Some(e.offset);
    }
});
