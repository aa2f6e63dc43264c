//! Keyword normalisation, shared by the index (file names) and by queries so
//! that both sides agree on what a word is.
//!
//! A word is a maximal run of alphanumeric characters (Unicode), lowercased,
//! cut to `MAX_WORD_BYTES`. `"My_Song (Live).MP3"` → `my song live mp3`.

use crate::limits::MAX_WORD_BYTES;
use crate::msg::truncate_utf8;

/// The distinct words of `text`, in order of first appearance.
pub fn words(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for raw in text.split(|c: char| !c.is_alphanumeric()) {
        if raw.is_empty() {
            continue;
        }
        let mut w = raw.to_lowercase();
        truncate_utf8(&mut w, MAX_WORD_BYTES);
        if !out.contains(&w) {
            out.push(w);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lowercases_and_dedupes() {
        assert_eq!(
            words("My_Song (Live).MP3 my"),
            ["my", "song", "live", "mp3"]
        );
        assert_eq!(words("  ..//  "), Vec::<String>::new());
        assert_eq!(words("Ünïcode Straße"), ["ünïcode", "straße"]);
    }

    #[test]
    fn long_words_are_cut_at_a_char_boundary() {
        let w = words(&"é".repeat(100));
        assert_eq!(w.len(), 1);
        assert!(w[0].len() <= MAX_WORD_BYTES);
    }
}
