//! The SPEC section 1 normalizer: NFKC, NFD, no marks, lowercase, collapsed and stripped
//! whitespace, fused into one pass and tested against the `tokenizers` normalizers it replaces.

use unicode_normalization_alignments::char::is_combining_mark;
use unicode_normalization_alignments::UnicodeNormalization;

/// Stands in for a lone space while the string is stripped (SPEC section 1).
const SENTINEL: char = '\u{E000}';

/// Chars every normalization step leaves alone: ASCII (but for lowercasing and whitespace) and
/// the CJK Unified Ideographs block (no decomposition, no case, not a mark, and no canonical
/// composition starts or ends with one).
fn nfkc_nfd_stable(c: char) -> bool {
    c.is_ascii() || ('\u{4E00}'..='\u{9FFF}').contains(&c)
}

/// The SPEC section 1 normalizer: NFKC, NFD, no marks, lowercase, one space per whitespace run,
/// stripped (a lone space survives).
///
/// The steps of the `tokenizers` normalizers the reference chains (`NFKC`, `NFD`,
/// `StripAccents`, `Lowercase`, `Replace`, `Strip`) fused into one pass over the chars, with the
/// same Unicode tables; the tests check it against that chain.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    normalize_into(text, &mut String::new(), &mut out);
    out
}

/// Appends `normalize(text)` to `out`; `scratch` is working space (its content is overwritten).
pub(crate) fn normalize_into(text: &str, scratch: &mut String, out: &mut String) {
    scratch.clear();
    let mut in_run = false;
    let mut push = |c: char| {
        // No char lowercases to whitespace, so collapsing after lowercasing each char is the
        // same as collapsing the lowercased string.
        if matches!(c, ' ' | '\t' | '\r' | '\n') {
            if !in_run {
                scratch.push(' ');
            }
            in_run = true;
        } else {
            scratch.push(c);
            in_run = false;
        }
    };
    if text.chars().all(nfkc_nfd_stable) {
        // Both normalizations are the identity on these chars and none is a mark.
        text.chars().for_each(|c| push(c.to_ascii_lowercase()));
    } else {
        let nfkc: String = text.nfkc().map(|(c, _)| c).collect();
        for (c, _) in nfkc.nfd() {
            if !is_combining_mark(c) {
                c.to_lowercase().for_each(&mut push);
            }
        }
    }
    if scratch == " " {
        out.push(' ');
        return;
    }
    let stripped = scratch.trim_matches(char::is_whitespace);
    // The reference turns every U+E000, not just its own sentinel, back into a space.
    for part in stripped.split_inclusive(SENTINEL) {
        match part.strip_suffix(SENTINEL) {
            Some(head) => {
                out.push_str(head);
                out.push(' ');
            }
            None => out.push_str(part),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;
    use tokenizers::normalizers::replace::ReplacePattern;
    use tokenizers::normalizers::{Lowercase, Replace, Sequence, Strip, StripAccents, NFD, NFKC};
    use tokenizers::{NormalizedString, Normalizer, NormalizerWrapper};

    /// The reference's chain of `tokenizers` normalizers, literally.
    fn normalize_reference(text: &str) -> String {
        static CHAIN: OnceLock<Sequence> = OnceLock::new();
        let chain = CHAIN.get_or_init(|| {
            let replace = |pattern: ReplacePattern, content: &str| {
                NormalizerWrapper::from(Replace::new(pattern, content).unwrap())
            };
            Sequence::new(vec![
                NFKC.into(),
                NFD.into(),
                StripAccents.into(),
                Lowercase.into(),
                replace(ReplacePattern::Regex(r"[ \t\r\n]+".into()), " "),
                replace(ReplacePattern::Regex(r"^ $".into()), "\u{E000}"),
                Strip::new(true, true).into(),
                replace(ReplacePattern::String("\u{E000}".into()), " "),
            ])
        });
        let mut s = NormalizedString::from(text);
        chain.normalize(&mut s).unwrap();
        s.get().to_owned()
    }

    #[test]
    fn spec_examples() {
        for (input, expected) in [
            ("ΟΔΟΣ", "οδοσ"),
            ("İstanbul", "istanbul"),
            ("Ａｐｐｌｅ", "apple"),
            ("ǅ", "dz"),
            ("ना\u{0903}", "न"),
            ("\u{3000}", " "),
            (" Apple ", "apple"),
            ("\t\n", " "),
            ("ﬁ", "fi"),
            ("", ""),
            (" \u{a0}", " "),
            ("\u{a0}X\u{2009}", "x"),
            ("\u{200b}", "\u{200b}"),
            (" \u{E000}x ", " x"),
            ("\u{E000}a\u{E000}\u{E000}", " a  "),
            (" 中文 Ab ", "中文 ab"),
            ("\u{2F00}\u{F900}", "一豈"),
        ] {
            assert_eq!(normalize(input), expected, "{input:?}");
            assert_eq!(normalize_reference(input), expected, "{input:?}");
        }
    }

    /// Chars where the normalization steps do something: spaces of every kind, marks of the three
    /// categories, compatibility forms, case mappings that grow or depend on context, the
    /// sentinel itself, CJK ideographs next to compatibility and radical forms, and a few plain
    /// letters.
    const TRICKY: &[char] = &[
        ' ', '\t', '\r', '\n', '\x0b', '\x0c', '\u{85}', '\u{a0}', '\u{1680}', '\u{2009}',
        '\u{2028}', '\u{3000}', '\u{200b}', '\u{200d}', '\u{feff}', '\u{301}', '\u{327}',
        '\u{903}', '\u{94d}', '\u{20dd}', '\u{488}', 'Σ', 'σ', 'ς', 'İ', 'ı', 'ǅ', 'ß', 'ẞ', 'ﬁ',
        'Å', 'Å', 'Ａ', 'ｶ', '゙', 'が', '가', '\u{1100}', '\u{1161}', '①', '²', '㎏', 'ℌ',
        '\u{E000}', '\u{FFFD}', 'a', 'Z', '0', '.', 'é', 'ñ', '中', '\u{4E00}', '\u{9FFF}',
        '\u{F900}', '\u{2F00}', '\u{3400}', '😀',
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn fused_normalizer_matches_the_chain(
            tricky in prop::collection::vec(prop::sample::select(TRICKY), 0..10),
            any_text in "\\PC{0,6}",
            ascii in "[ -~\t\r\n\x0b\x0c\x1c-\x1f]{0,12}",
            cjk in "[ A-Za-z\u{4E00}-\u{9FFF}\u{E000}]{0,8}",
        ) {
            let tricky: String = tricky.into_iter().collect();
            for s in [&tricky, &any_text, &ascii, &cjk, &format!("{tricky}{any_text}")] {
                prop_assert_eq!(normalize(s), normalize_reference(s), "{:?}", s);
            }
        }
    }
}
