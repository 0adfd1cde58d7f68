//! Whisper vocabulary: loading CTranslate2's token list and turning GPT-2
//! byte-level BPE token strings back into the raw bytes whisper.cpp expects.
//!
//! GPT-2's tokenizer works on unicode strings, so every byte 0..=255 is mapped
//! to a printable code point: bytes that are already printable (and not space)
//! map to themselves, the remaining 68 bytes map, in ascending order, to
//! U+0100..U+0143. CTranslate2 stores tokens in that unicode form (`Ġthe` for
//! b" the"), while whisper.cpp's vocabulary holds the raw bytes (as OpenAI's
//! `gpt2.tiktoken` does), so the mapping has to be inverted.

use std::fs;
use std::path::Path;

use super::ConvertError;

/// Token whose id marks the end of the plain BPE vocabulary in every Whisper
/// tokenizer; all ids from it on are special tokens.
pub(crate) const END_OF_TEXT: &str = "<|endoftext|>";

/// Whether `b` is one of the bytes GPT-2 keeps as its own code point.
fn is_printable_byte(b: u32) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// Inverse of GPT-2's `bytes_to_unicode` table for a single character.
///
/// Returns `None` for characters that no byte maps to, which means the token
/// is not byte-level BPE text.
pub fn gpt2_char_to_byte(c: char) -> Option<u8> {
    let cp = u32::from(c);
    if is_printable_byte(cp) {
        return u8::try_from(cp).ok();
    }
    // The non-printable bytes, in ascending order, are 0x00..=0x20 (33 bytes),
    // 0x7F..=0xA0 (34 bytes) and 0xAD (1 byte); the n-th of them is U+0100+n.
    let n = cp.checked_sub(0x100)?;
    match n {
        0..=32 => u8::try_from(n).ok(),
        33..=66 => u8::try_from(0x7F + (n - 33)).ok(),
        67 => Some(0xAD),
        _ => None,
    }
}

/// Decode a GPT-2 byte-level token string (e.g. `"Ġthe"`) into its raw bytes.
pub fn gpt2_token_to_bytes(token: &str) -> Option<Vec<u8>> {
    token.chars().map(gpt2_char_to_byte).collect()
}

/// Read CTranslate2's vocabulary for the model in `dir`, in token-id order.
///
/// Converters write `vocabulary.txt` (one token per line, line i = id i) in
/// older CTranslate2 releases and `vocabulary.json` (a JSON array) in newer
/// ones, so both are accepted.
pub(crate) fn load_ct2_vocabulary(dir: &Path) -> Result<Vec<String>, ConvertError> {
    let json_path = dir.join("vocabulary.json");
    if json_path.is_file() {
        let text = fs::read_to_string(&json_path).map_err(|e| ConvertError::io(&json_path, e))?;
        return serde_json::from_str::<Vec<String>>(&text).map_err(|e| {
            ConvertError::Vocabulary(format!(
                "{}: not a JSON list of strings: {e}",
                json_path.display()
            ))
        });
    }
    let txt_path = dir.join("vocabulary.txt");
    let text = fs::read_to_string(&txt_path).map_err(|e| ConvertError::io(&txt_path, e))?;
    // Tokens never contain a newline in this form (a newline byte is `Ċ`), so
    // splitting on '\n' is exact; only the file's final newline is dropped.
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(text
        .split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line).to_owned())
        .collect())
}

/// Turn the CTranslate2 vocabulary into the byte tokens to store in the ggml
/// file.
///
/// Only the plain BPE tokens (ids below `<|endoftext|>`) are returned, which is
/// what OpenAI's tiktoken files and hence whisper.cpp's own converter store:
/// whisper.cpp derives the ids of `<|endoftext|>`, `<|startoftranscript|>`,
/// language, task and timestamp tokens from `n_vocab` and gives them its own
/// names, so those must not be read from the file. The returned list keeps the
/// id order, since whisper.cpp assigns ids by position.
pub(crate) fn ggml_vocabulary(
    tokens: &[String],
    n_vocab: usize,
) -> Result<Vec<Vec<u8>>, ConvertError> {
    if tokens.len() != n_vocab {
        return Err(ConvertError::Vocabulary(format!(
            "vocabulary has {} tokens but the embedding matrix has {n_vocab} rows",
            tokens.len()
        )));
    }
    let eot = tokens
        .iter()
        .position(|t| t == END_OF_TEXT)
        .ok_or_else(|| ConvertError::Vocabulary(format!("no {END_OF_TEXT} token")))?;
    check_special_ids(tokens, eot, n_vocab)?;
    tokens[..eot]
        .iter()
        .enumerate()
        .map(|(id, token)| {
            gpt2_token_to_bytes(token).ok_or_else(|| {
                ConvertError::Vocabulary(format!(
                    "token {id} ({token:?}) is not GPT-2 byte-level text"
                ))
            })
        })
        .collect()
}

/// whisper.cpp never reads special-token ids from the file: it hard-codes them
/// for English-only models and shifts them by `n_vocab` for multilingual ones.
/// A tokenizer laid out differently would load fine and then decode garbage,
/// so the positions are checked here against that same rule.
fn check_special_ids(tokens: &[String], eot: usize, n_vocab: usize) -> Result<(), ConvertError> {
    // whisper.cpp: multilingual iff n_vocab >= 51865, which moves
    // <|endoftext|> from 50256 to 50257; the timestamp tokens <|0.00|> ..
    // <|30.00|> (1501 of them) always end the vocabulary, whatever the number
    // of language tokens before them.
    let expected_eot = if n_vocab >= 51865 { 50257 } else { 50256 };
    let expected_beg = n_vocab.checked_sub(1501).unwrap_or(usize::MAX);
    let beg = tokens.iter().position(|t| t == "<|0.00|>");
    if eot != expected_eot || beg != Some(expected_beg) {
        return Err(ConvertError::Vocabulary(format!(
            "special tokens are not where whisper.cpp expects them for n_vocab {n_vocab}: \
             {END_OF_TEXT} at {eot} (expected {expected_eot}), <|0.00|> at {beg:?} (expected {expected_beg})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_ascii_maps_to_itself() {
        assert_eq!(
            gpt2_token_to_bytes("hello!").as_deref(),
            Some(&b"hello!"[..])
        );
        assert_eq!(gpt2_char_to_byte('~'), Some(b'~'));
    }

    #[test]
    fn remapped_control_and_space_bytes() {
        // Space is the 33rd non-printable byte (index 32) -> U+0120 'Ġ'.
        assert_eq!(gpt2_token_to_bytes("Ġthe").as_deref(), Some(&b" the"[..]));
        // Newline 0x0A -> U+010A 'Ċ'; NUL -> U+0100 'Ā'.
        assert_eq!(gpt2_token_to_bytes("ĊĊ").as_deref(), Some(&b"\n\n"[..]));
        assert_eq!(gpt2_char_to_byte('Ā'), Some(0x00));
        // 0x7F (DEL) follows the 33 low bytes -> U+0121 'ġ'.
        assert_eq!(gpt2_char_to_byte('ġ'), Some(0x7F));
        // 0xA0 (NBSP) is the last of the 0x7F..=0xA0 run -> U+0142 'ł'.
        assert_eq!(gpt2_char_to_byte('ł'), Some(0xA0));
        // 0xAD (soft hyphen) is the very last remapped byte -> U+0143 'Ń'.
        assert_eq!(gpt2_char_to_byte('Ń'), Some(0xAD));
    }

    #[test]
    fn latin1_bytes_kept_and_utf8_reassembled() {
        // 'é' is UTF-8 C3 A9; both bytes are printable Latin-1 code points.
        assert_eq!(gpt2_token_to_bytes("Ã©").as_deref(), Some("é".as_bytes()));
        assert_eq!(gpt2_char_to_byte('®'), Some(0xAE));
        assert_eq!(gpt2_char_to_byte('¡'), Some(0xA1));
    }

    #[test]
    fn every_byte_round_trips() {
        // Rebuild the forward table independently and check the inverse.
        let mut seen = [false; 256];
        let mut next_extra = 0x100u32;
        for b in 0u32..256 {
            let c = if is_printable_byte(b) {
                b
            } else {
                let c = next_extra;
                next_extra += 1;
                c
            };
            let back = gpt2_char_to_byte(char::from_u32(c).unwrap()).unwrap();
            assert_eq!(u32::from(back), b);
            seen[back as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(next_extra, 0x100 + 68);
    }

    #[test]
    fn unmapped_characters_are_rejected() {
        assert_eq!(gpt2_char_to_byte(' '), None); // raw space never appears
        assert_eq!(gpt2_char_to_byte('\u{AD}'), None); // raw soft hyphen either
        assert_eq!(gpt2_char_to_byte('\u{144}'), None); // past the table
        assert_eq!(gpt2_token_to_bytes("a b"), None);
    }

    #[test]
    fn vocabulary_is_cut_at_end_of_text_and_checked() {
        let mut tokens: Vec<String> = (0..51864).map(|i| format!("t{i}")).collect();
        tokens[50256] = END_OF_TEXT.to_owned();
        tokens[50363] = "<|0.00|>".to_owned();
        tokens[1] = "Ġa".to_owned();
        let out = ggml_vocabulary(&tokens, 51864).unwrap();
        assert_eq!(out.len(), 50256);
        assert_eq!(out[1], b" a");

        tokens[50363] = "x".to_owned();
        tokens[50364] = "<|0.00|>".to_owned();
        assert!(ggml_vocabulary(&tokens, 51864).is_err());
        assert!(ggml_vocabulary(&tokens, 51865).is_err());
    }
}
