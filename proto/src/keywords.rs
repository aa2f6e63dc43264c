//! Keyword normalisation, shared by the index (file names) and by queries so
//! that both sides agree on what a word is.
//!
//! A word is a maximal run of alphanumeric characters (Unicode), lowercased,
//! without what lowercasing adds that is not alphanumeric, cut to
//! `MAX_WORD_BYTES`. `"My_Song (Live).MP3"` → `my song live mp3`.
//!
//! The words are normal: the words of a word are that word, so a client
//! may send words it has split itself and the supernode, which normalises
//! what it is sent, reads the same ones.

use crate::limits::MAX_WORD_BYTES;
use crate::msg::truncate_utf8;

/// The distinct words of `text`, in order of first appearance.
pub fn words(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for raw in text.split(|c: char| !c.is_alphanumeric()) {
        if raw.is_empty() {
            continue;
        }
        // Lowercasing can add a mark that is not alphanumeric ("İ" is "i"
        // and U+0307 COMBINING DOT ABOVE): dropped, or the word would split
        // when normalised again.
        let mut w: String = raw
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric())
            .collect();
        truncate_utf8(&mut w, MAX_WORD_BYTES);
        if !w.is_empty() && !out.contains(&w) {
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

    /// Found by the `keywords` fuzz target: "İ" lowercases to "i" and a
    /// combining dot, which is not alphanumeric, so the word it gave split
    /// in two when normalised again.
    #[test]
    fn words_are_normal_even_when_lowercasing_adds_a_mark() {
        assert_eq!(words("İstanbul.jpg"), ["istanbul", "jpg"]);
        assert_eq!(words("istanbul"), ["istanbul"]);
        for w in words("İSTANBUL İzmir ΣΊΣΥΦΟΣ ǅungla Straße") {
            assert_eq!(words(&w), std::slice::from_ref(&w));
        }
    }

    #[test]
    fn long_words_are_cut_at_a_char_boundary() {
        let w = words(&"é".repeat(100));
        assert_eq!(w.len(), 1);
        assert!(w[0].len() <= MAX_WORD_BYTES);
    }
}
