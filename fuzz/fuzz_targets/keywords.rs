//! The keyword normaliser: the words of any text are non-empty, within
//! `MAX_WORD_BYTES`, distinct, and normal: normalising them again (as a
//! supernode does with the words a client sends) gives them back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use servent_proto::keywords::words;
use servent_proto::limits::MAX_WORD_BYTES;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let ws = words(text);
    for (i, w) in ws.iter().enumerate() {
        assert!(!w.is_empty() && w.len() <= MAX_WORD_BYTES, "{w:?}");
        assert!(!ws[..i].contains(w), "{w:?} twice");
        assert_eq!(
            words(w),
            std::slice::from_ref(w),
            "{w:?} is not a normal word"
        );
    }
    assert_eq!(words(&ws.join(" ")), ws);
});
