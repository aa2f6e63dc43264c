//! The name rule: what `sanitise` returns obeys the rule (no refused
//! character, NFC, 1 to `MAX_NAME_BYTES` bytes, not `.`/`..`) and is a
//! fixed point; `check` accepts exactly the fixed points; `Escaped` output
//! holds nothing a terminal obeys.
#![no_main]

use libfuzzer_sys::fuzz_target;
use servent_proto::limits::MAX_NAME_BYTES;
use servent_proto::name::{check, nfc, refused_class, sanitise, CharClass, Escaped};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    match sanitise(raw) {
        Ok(name) => {
            assert!(name.chars().all(|c| refused_class(c).is_none()), "{name:?}");
            assert!(!name.is_empty() && name.len() <= MAX_NAME_BYTES);
            assert!(name != "." && name != "..");
            assert_eq!(nfc(&name), name);
            assert_eq!(check(&name), Ok(()));
            assert_eq!(sanitise(&name).as_ref(), Ok(&name));
            assert_eq!(check(raw).is_ok(), name == raw);
        }
        Err(e) => {
            assert!(check(raw).is_err());
            let message = e.to_string();
            assert!(
                message
                    .chars()
                    .all(|c| matches!(refused_class(c), None | Some(CharClass::PathSeparator))),
                "{message:?}"
            );
        }
    }
    let shown = Escaped(raw).to_string();
    assert!(shown
        .chars()
        .all(|c| matches!(refused_class(c), None | Some(CharClass::PathSeparator))));
});
