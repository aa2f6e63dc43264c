//! File names: the one rule for what a leaf may announce and a supernode
//! indexes, and how a name from the network is shown to a person.
//!
//! A name is one path component a person could read and type: NFC
//! (Unicode Normalization Form C), 1 to [`MAX_NAME_BYTES`] bytes of UTF-8
//! after normalisation, not `.` or `..`, without `/` or `\`, and without any
//! character of the refused classes of [`refused_class`]: controls (Cc),
//! format characters (Cf: the bidi controls, the zero-width characters, the
//! BOM, the tag characters, ...), the line and paragraph separators and the
//! noncharacters. `docs/PROTOCOL.md` (section 8.2) states the same rule.
//!
//! Refused, not neutralised. A name with a right-to-left override
//! (`"\u{202e}gpj.exe"` shows as `exe.jpg`) or a zero-width space is almost
//! always a disguise, not a name worth repairing; a repaired name would no
//! longer be the file's name on disk, so the leaf would announce one name
//! and hold another, and dropping invisible characters makes distinct
//! files collide (`"a\u{200b}b"` and `"ab"`). So [`sanitise`] only
//! normalises (which changes no character a person sees) and refuses the
//! rest, a leaf skips such a file with a warning, and a supernode ends the
//! session of a leaf that announces one. The cost: names that need a
//! zero-width joiner or non-joiner (emoji sequences, some Persian and
//! Indic spellings) cannot be shared under that name.
//!
//! What this module is not: the rule for the name a downloader creates on
//! its disk (the leaf's `safe_file_name` adds what Windows refuses), and
//! keyword splitting ([`crate::keywords`]).

use std::fmt;

use unicode_normalization::UnicodeNormalization;

use crate::limits::MAX_NAME_BYTES;

/// Why a character may not be in a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CharClass {
    /// General category Cc (C0, DEL, C1).
    Control,
    /// Bidirectional formatting: U+061C, U+200E, U+200F, U+202A–U+202E,
    /// U+2066–U+2069.
    Bidi,
    /// Zero-width characters: U+200B–U+200D, U+2060, U+FEFF (BOM).
    ZeroWidth,
    /// U+2028 LINE SEPARATOR, U+2029 PARAGRAPH SEPARATOR.
    Separator,
    /// U+FDD0–U+FDEF and the last two code points of every plane.
    Noncharacter,
    /// Any other character of general category Cf (format): invisible
    /// characters that change how others render (soft hyphen, invisible
    /// operators, tag characters, ...).
    Format,
    /// `/` and `\`: a name is one path component on every platform.
    PathSeparator,
}

impl fmt::Display for CharClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Control => "a control character",
            Self::Bidi => "a bidirectional control",
            Self::ZeroWidth => "a zero-width character",
            Self::Separator => "a line or paragraph separator",
            Self::Noncharacter => "a noncharacter",
            Self::Format => "an invisible format character",
            Self::PathSeparator => "a path separator",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("file name is empty")]
    Empty,
    #[error("file name of {len} bytes exceeds {MAX_NAME_BYTES} bytes")]
    TooLong { len: usize },
    #[error("file name {0:?} is not a plain file name")]
    Dots(String),
    #[error("file name {name:?} holds {class} ({ch:?})")]
    Refused {
        /// The name's first 64 characters (the message quotes it escaped).
        name: String,
        ch: char,
        class: CharClass,
    },
    #[error("file name {0:?} is not in Unicode Normalization Form C")]
    NotNfc(String),
}

/// Format characters (general category Cf, Unicode 16.0) not in a more
/// precise class above, as inclusive ranges.
const OTHER_FORMAT: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x2061, 0x2064),
    (0x206A, 0x206F),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

/// The class that keeps `c` out of a name, if any.
pub fn refused_class(c: char) -> Option<CharClass> {
    let u = c as u32;
    Some(match u {
        _ if c.is_control() => CharClass::Control,
        0x061C | 0x200E | 0x200F | 0x202A..=0x202E | 0x2066..=0x2069 => CharClass::Bidi,
        0x200B..=0x200D | 0x2060 | 0xFEFF => CharClass::ZeroWidth,
        0x2028 | 0x2029 => CharClass::Separator,
        0xFDD0..=0xFDEF => CharClass::Noncharacter,
        _ if u & 0xFFFE == 0xFFFE => CharClass::Noncharacter,
        _ if c == '/' || c == '\\' => CharClass::PathSeparator,
        _ if OTHER_FORMAT.iter().any(|&(lo, hi)| (lo..=hi).contains(&u)) => CharClass::Format,
        _ => return None,
    })
}

/// `s` in Unicode Normalization Form C.
pub fn nfc(s: &str) -> String {
    s.nfc().collect()
}

/// Checks a name as it travels: it must already be NFC and obey the rule.
/// This is what a supernode applies to every `FileEntry.name`.
pub fn check(name: &str) -> Result<(), NameError> {
    check_chars(name)?;
    if !unicode_normalization::is_nfc(name) {
        return Err(NameError::NotNfc(quote(name)));
    }
    Ok(())
}

/// The name to announce for `raw` (a file name as the file system gives
/// it): `raw` in NFC if that obeys the rule. Idempotent: a name it returns
/// passes [`check`] and comes back unchanged.
pub fn sanitise(raw: &str) -> Result<String, NameError> {
    let name = nfc(raw);
    check_chars(&name)?;
    Ok(name)
}

/// Every rule but normalisation.
fn check_chars(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong { len: name.len() });
    }
    if name == "." || name == ".." {
        return Err(NameError::Dots(name.to_string()));
    }
    if let Some((ch, class)) = name.chars().find_map(|c| Some((c, refused_class(c)?))) {
        return Err(NameError::Refused {
            name: quote(name),
            ch,
            class,
        });
    }
    Ok(())
}

/// The first 64 characters of `name`, for an error message (which quotes
/// it with `{:?}`, so nothing in it reaches a terminal raw).
fn quote(name: &str) -> String {
    name.chars().take(64).collect()
}

/// Shows text from the network (a name, an error message) without letting
/// it steer a terminal: every character of a refused class other than the
/// path separators is written as `\u{…}`, everything else as it is.
/// `Escaped("\u{202e}gpj.exe")` shows `\u{202e}gpj.exe`.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match refused_class(c) {
                None | Some(CharClass::PathSeparator) => fmt::Write::write_char(f, c)?,
                Some(_) => write!(f, "\\u{{{:x}}}", c as u32)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn class_of(name: &str) -> Option<CharClass> {
        match sanitise(name) {
            Err(NameError::Refused { class, .. }) => Some(class),
            _ => None,
        }
    }

    #[test]
    fn plain_names_pass_unchanged() {
        for n in [
            "Blue Moon.mp3",
            "Straße – Ünïcode.flac",
            "日本語のファイル.txt",
            "a.b.c",
            "...",
            ".hidden",
            "x\u{a0}y",
            "emoji 🎵.ogg",
            "\u{e000} private use",
        ] {
            assert_eq!(sanitise(n).as_deref(), Ok(n), "{n:?}");
            assert_eq!(check(n), Ok(()), "{n:?}");
        }
    }

    #[test]
    fn names_are_normalised_to_nfc() {
        // "e" + COMBINING ACUTE ACCENT is "é" (U+00E9).
        assert_eq!(sanitise("cafe\u{301}.txt").as_deref(), Ok("caf\u{e9}.txt"));
        assert!(matches!(
            check("cafe\u{301}.txt"),
            Err(NameError::NotNfc(_))
        ));
        // A singleton decomposition: ANGSTROM SIGN is Å.
        assert_eq!(sanitise("\u{212b}").as_deref(), Ok("\u{c5}"));
    }

    #[test]
    fn what_was_refused_before_still_is() {
        assert_eq!(sanitise(""), Err(NameError::Empty));
        assert!(matches!(sanitise("."), Err(NameError::Dots(_))));
        assert!(matches!(sanitise(".."), Err(NameError::Dots(_))));
        assert_eq!(
            sanitise(&"a".repeat(MAX_NAME_BYTES + 1)),
            Err(NameError::TooLong {
                len: MAX_NAME_BYTES + 1
            })
        );
        assert!(sanitise(&"a".repeat(MAX_NAME_BYTES)).is_ok());
        assert_eq!(class_of("a/b"), Some(CharClass::PathSeparator));
        assert_eq!(class_of("a\\b"), Some(CharClass::PathSeparator));
    }

    #[test]
    fn the_length_counts_after_normalisation() {
        // U+0958 has a composition exclusion: NFC is two code points, 6 bytes
        // where the raw form has 3.
        let raw = "\u{958}".repeat(50);
        assert_eq!(raw.len(), 150);
        assert_eq!(sanitise(&raw), Err(NameError::TooLong { len: 300 }));
    }

    #[test]
    fn controls_are_refused() {
        for c in [
            '\0', '\n', '\r', '\t', '\u{1b}', '\u{7f}', '\u{85}', '\u{9b}',
        ] {
            assert_eq!(
                class_of(&format!("a{c}b")),
                Some(CharClass::Control),
                "{c:?}"
            );
        }
    }

    #[test]
    fn bidi_controls_are_refused() {
        for u in [
            0x061C, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E,
        ]
        .into_iter()
        .chain(0x2066..=0x2069)
        {
            let c = char::from_u32(u).unwrap();
            assert_eq!(class_of(&format!("a{c}b")), Some(CharClass::Bidi), "{u:x}");
        }
        assert_eq!(class_of("\u{202e}gpj.exe"), Some(CharClass::Bidi));
    }

    #[test]
    fn zero_width_characters_are_refused() {
        for c in ['\u{200B}', '\u{200C}', '\u{200D}', '\u{2060}', '\u{FEFF}'] {
            assert_eq!(
                class_of(&format!("a{c}b")),
                Some(CharClass::ZeroWidth),
                "{c:?}"
            );
        }
        // A BOM at the front too.
        assert_eq!(class_of("\u{FEFF}name"), Some(CharClass::ZeroWidth));
    }

    #[test]
    fn line_and_paragraph_separators_are_refused() {
        assert_eq!(class_of("a\u{2028}b"), Some(CharClass::Separator));
        assert_eq!(class_of("a\u{2029}b"), Some(CharClass::Separator));
    }

    #[test]
    fn noncharacters_are_refused_in_every_plane() {
        for u in (0xFDD0..=0xFDEF)
            .chain((0..=0x10u32).flat_map(|p| [p << 16 | 0xFFFE, p << 16 | 0xFFFF]))
        {
            let c = char::from_u32(u).unwrap();
            assert_eq!(
                class_of(&format!("a{c}b")),
                Some(CharClass::Noncharacter),
                "{u:x}"
            );
        }
        // Their neighbours are ordinary.
        assert_eq!(refused_class('\u{FDCF}'), None);
        assert_eq!(refused_class('\u{FDF0}'), None);
        assert_eq!(refused_class('\u{1FFFD}'), None);
    }

    #[test]
    fn other_format_characters_are_refused() {
        for c in [
            '\u{AD}',
            '\u{600}',
            '\u{180E}',
            '\u{2062}',
            '\u{206A}',
            '\u{FFF9}',
            '\u{E0001}',
            '\u{E0041}',
        ] {
            assert_eq!(
                class_of(&format!("a{c}b")),
                Some(CharClass::Format),
                "{c:?}"
            );
        }
        // Variation selectors are marks, not format characters: emoji
        // presentation (U+FE0F) stays allowed.
        assert_eq!(refused_class('\u{FE0F}'), None);
    }

    #[test]
    fn error_messages_quote_the_name_escaped() {
        let e = sanitise("\u{202e}gpj.exe").unwrap_err().to_string();
        assert_eq!(
            e,
            "file name \"\\u{202e}gpj.exe\" holds a bidirectional control ('\\u{202e}')"
        );
        assert!(!e
            .chars()
            .any(|c| refused_class(c).is_some_and(|k| k != CharClass::PathSeparator)));
    }

    #[test]
    fn escaped_shows_refused_characters_as_escapes() {
        assert_eq!(Escaped("\u{202e}gpj.exe").to_string(), "\\u{202e}gpj.exe");
        assert_eq!(Escaped("a\nb\u{1b}[31m").to_string(), "a\\u{a}b\\u{1b}[31m");
        assert_eq!(Escaped("Blue Moon/é.mp3").to_string(), "Blue Moon/é.mp3");
    }

    /// Strings rich in the characters the rule is about.
    fn hostile() -> impl Strategy<Value = String> {
        let special = prop::sample::select(vec![
            '\u{202e}',
            '\u{200b}',
            '\u{200d}',
            '\u{feff}',
            '\u{2028}',
            '\u{fdd0}',
            '\u{fffe}',
            '\u{10ffff}',
            '\u{301}',
            '\u{212b}',
            '\u{958}',
            '\u{ad}',
            '\u{e0041}',
            '\0',
            '\n',
            '/',
            '\\',
            '.',
            'e',
            'é',
            ' ',
        ]);
        let c = prop_oneof![any::<char>(), special];
        prop::collection::vec(c, 0..80).prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        #[test]
        fn sanitised_names_obey_the_rule(raw in hostile()) {
            if let Ok(name) = sanitise(&raw) {
                prop_assert!(name.chars().all(|c| refused_class(c).is_none()));
                prop_assert!(unicode_normalization::is_nfc(&name));
                prop_assert!(!name.is_empty() && name.len() <= MAX_NAME_BYTES);
                prop_assert_eq!(check(&name), Ok(()));
                prop_assert_eq!(sanitise(&name), Ok(name.clone()));
            }
            // `check` accepts exactly the fixed points of `sanitise`.
            prop_assert_eq!(check(&raw).is_ok(), sanitise(&raw).as_deref() == Ok(raw.as_str()));
        }

        #[test]
        fn escaped_text_holds_no_refused_character(raw in hostile()) {
            let shown = Escaped(&raw).to_string();
            prop_assert!(shown
                .chars()
                .all(|c| matches!(refused_class(c), None | Some(CharClass::PathSeparator))));
        }
    }
}
