use std::fs;
use std::path::Path;

use super::byte_bpe::{byte_to_char, char_to_byte};
use super::*;
use crate::test_support::{generated_corpus, varied_strings};

fn no_corpus() -> std::iter::Empty<&'static str> {
    std::iter::empty()
}

fn assert_round_trips(tok: &Tokenizer, texts: &[String]) {
    for text in texts {
        let ids = tok.encode(text).unwrap_or_else(|e| panic!("encode {text:?}: {e}"));
        assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()), "{text:?}: {ids:?}");
        assert_eq!(&tok.decode(&ids).unwrap(), text, "ids {ids:?}");
        assert_eq!(tok.decode_bytes(&ids).unwrap(), text.as_bytes());
    }
}

/// Asserts a `BadTokenizerFile` error that names `path` and contains `what`.
fn assert_bad_file(result: Result<Tokenizer>, path: &Path, what: &str) {
    match result {
        Err(e @ Error::BadTokenizerFile { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "no file name in: {msg}");
            assert!(msg.contains(what), "expected {what:?} in: {msg}");
        }
        Err(e) => panic!("expected BadTokenizerFile, got {e}"),
        Ok(t) => panic!("expected an error, loaded {t:?}"),
    }
}

#[test]
fn spec_parses_the_three_names_and_rejects_others() {
    assert_eq!("gpt2".parse::<TokenizerSpec>().unwrap(), TokenizerSpec::Gpt2);
    assert_eq!("char".parse::<TokenizerSpec>().unwrap(), TokenizerSpec::Char);
    assert_eq!("bpe:512".parse::<TokenizerSpec>().unwrap(), TokenizerSpec::Bpe { vocab_size: 512 });
    for bad in ["gpt3", "bpe:", "bpe:x", "bpe", "", "char:10"] {
        let err = bad.parse::<TokenizerSpec>().unwrap_err();
        assert!(matches!(err, Error::UnknownTokenizer(ref n) if n == bad), "{bad}: {err}");
    }
    assert_eq!(TokenizerSpec::Bpe { vocab_size: 300 }.to_string(), "bpe:300");
}

#[test]
fn gpt2_encodes_hello_world_as_15496_995() {
    let tok = Tokenizer::by_name("gpt2", no_corpus()).unwrap();
    assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(tok.decode(&[15496, 995]).unwrap(), "Hello world");
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.eot(), Some(50256));
    assert_eq!(tok.decode(&[50256]).unwrap(), "<|endoftext|>");
}

#[test]
fn gpt2_round_trips_varied_unicode_text() {
    assert_round_trips(&Tokenizer::gpt2(), &varied_strings(300));
}

#[test]
fn gpt2_encodes_literal_end_of_text_as_ordinary_text() {
    let tok = Tokenizer::gpt2();
    let ids = tok.encode("a<|endoftext|>b").unwrap();
    assert!(!ids.contains(&50256), "{ids:?}");
}

#[test]
fn gpt2_decode_rejects_id_past_the_vocabulary() {
    let err = Tokenizer::gpt2().decode(&[15496, 50257]).unwrap_err();
    assert!(matches!(err, Error::TokenOutOfRange { id: 50257, .. }), "{err}");
    assert!(err.to_string().contains("50257"), "{err}");
}

#[test]
fn decode_bytes_gives_partial_utf8_per_token() {
    let tok = Tokenizer::gpt2();
    let text = "🦀 crab";
    let ids = tok.encode(text).unwrap();
    let pieces: Vec<Vec<u8>> = ids.iter().map(|&id| tok.decode_bytes(&[id]).unwrap()).collect();
    assert_eq!(pieces.concat(), text.as_bytes());
    // The emoji's four bytes are split over several tokens, so some piece alone is not UTF-8.
    assert!(pieces.iter().any(|p| std::str::from_utf8(p).is_err()), "{pieces:?}");
    // `decode` of such a piece substitutes U+FFFD rather than failing.
    let partial =
        ids.iter().position(|&id| std::str::from_utf8(&tok.decode_bytes(&[id]).unwrap()).is_err());
    assert!(tok.decode(&[ids[partial.unwrap()]]).unwrap().contains('\u{fffd}'));
}

/// Saves GPT-2's tokenizer to a temporary folder; returns the folder and the file's JSON.
fn saved_gpt2() -> (tempfile::TempDir, std::path::PathBuf, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    Tokenizer::gpt2().save(&path).unwrap();
    let json = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    (dir, path, json)
}

#[test]
fn gpt2_saves_a_hugging_face_file_that_encodes_like_tiktoken() {
    let (_dir, path, json) = saved_gpt2();
    assert_eq!(json["model"]["type"], "BPE");
    assert_eq!(json["model"]["vocab"].as_object().unwrap().len(), 50257);
    assert_eq!(json["model"]["vocab"]["Hello"], 15496);
    assert_eq!(json["model"]["vocab"]["Ġworld"], 995);
    assert_eq!(json["model"]["merges"].as_array().unwrap().len(), 50000);
    assert_eq!(json["pre_tokenizer"]["type"], "ByteLevel");
    assert_eq!(json["pre_tokenizer"]["add_prefix_space"], false);
    assert_eq!(json["decoder"]["type"], "ByteLevel");
    assert_eq!(json["added_tokens"][0]["content"], "<|endoftext|>");
    assert_eq!(json["added_tokens"][0]["id"], 50256);

    let hf = tokenizers::Tokenizer::from_file(&path).unwrap();
    let tik = Tokenizer::gpt2();
    let hf_ids = |text: &str| hf.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(hf_ids("Hello world"), vec![15496, 995]);
    assert_eq!(hf.get_vocab_size(true), 50257);
    let mut texts = varied_strings(300);
    texts.push(generated_corpus(100, 4));
    texts.push("  two  spaces,\ttabs\n\n\nnewlines; it's we'll 12345 €100 ÿ\u{0}".into());
    // Hugging Face encodes a literal "<|endoftext|>" as the added token; ferrite's gpt2
    // encodes it as text (see `Tokenizer::encode`), so such texts are compared without it.
    for text in texts.iter().map(|t| t.replace(END_OF_TEXT, "")) {
        let ids = tik.encode(&text).unwrap();
        assert_eq!(hf_ids(&text), ids, "{text:?}");
        assert_eq!(hf.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn gpt2_merges_are_the_published_ones_and_rebuild_every_token() {
    let (_dir, path, json) = saved_gpt2();
    // The start of GPT-2's merges.txt.
    let first: Vec<(String, String)> =
        serde_json::from_value(json["model"]["merges"].as_array().unwrap()[..7].into()).unwrap();
    let want = ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he"];
    for (got, want) in first.iter().zip(want) {
        assert_eq!(format!("{} {}", got.0, got.1), want);
    }
    // BPE over the merges alone (no whole-token shortcut) turns each token into itself.
    use tokenizers::Model;
    let hf = tokenizers::Tokenizer::from_file(&path).unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    for (token, id) in vocab {
        if token == "<|endoftext|>" {
            continue;
        }
        let pieces = hf.get_model().tokenize(token).unwrap();
        let ids: Vec<u32> = pieces.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![id.as_u64().unwrap() as u32], "{token:?}");
    }
}

#[test]
fn gpt2_round_trips_through_save_and_load() {
    let (_dir, path, _) = saved_gpt2();
    let tok = Tokenizer::load(&path).unwrap();
    assert_eq!(tok.kind(), "gpt2");
    assert_eq!(tok.eot(), Some(50256));
    assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
    // Still tiktoken: a literal end-of-text is ordinary text.
    assert!(!tok.encode("a<|endoftext|>b").unwrap().contains(&50256));
}

#[test]
fn gpt2_marker_file_written_before_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    fs::write(&path, r#"{"ferrite_tokenizer": "gpt2"}"#).unwrap();
    let tok = Tokenizer::load(&path).unwrap();
    assert_eq!(tok.kind(), "gpt2");
    assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
}

#[test]
fn gpt2_file_with_string_merges_loads_as_gpt2() {
    // Hugging Face's published GPT-2 file writes merges as "a b" and omits use_regex.
    let (_dir, path, mut json) = saved_gpt2();
    let merges: Vec<serde_json::Value> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()).into())
        .collect();
    json["model"]["merges"] = merges.into();
    json["pre_tokenizer"].as_object_mut().unwrap().remove("use_regex");
    fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    assert_eq!(Tokenizer::load(&path).unwrap().kind(), "gpt2");
}

#[test]
fn hugging_face_file_that_differs_from_gpt2_loads_through_hugging_face() {
    let (_dir, path, json) = saved_gpt2();
    let changes: [fn(&mut serde_json::Value); 4] = [
        |j| j["pre_tokenizer"]["add_prefix_space"] = true.into(),
        |j| {
            j["model"]["merges"].as_array_mut().unwrap().pop();
        },
        |j| j["model"]["vocab"]["Hello"] = 995.into(),
        |j| {
            let extra = serde_json::json!({"id": 50257, "content": "<pad>", "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true});
            j["added_tokens"].as_array_mut().unwrap().push(extra);
        },
    ];
    for (i, change) in changes.iter().enumerate() {
        let mut changed = json.clone();
        change(&mut changed);
        fs::write(&path, serde_json::to_string(&changed).unwrap()).unwrap();
        let tok = Tokenizer::load(&path).unwrap_or_else(|e| panic!("change {i}: {e}"));
        assert_eq!(tok.kind(), "bpe", "change {i}");
    }
}

#[test]
fn char_vocabulary_is_the_sorted_distinct_characters_of_the_corpus() {
    let tok = Tokenizer::by_name("char", ["hello world\n", "wörld"]).unwrap();
    // Sorted by code point: '\n' ' ' d e h l o r w ö
    assert_eq!(tok.vocab_size(), 10);
    assert_eq!(tok.encode("\n dehlorwö").unwrap(), (0..10).collect::<Vec<u32>>());
    assert_eq!(tok.eot(), None);
    let texts: Vec<String> = ["hello", "world\n", "", "wörld hello"].map(String::from).into();
    assert_round_trips(&tok, &texts);
}

#[test]
fn char_encode_names_the_unknown_character() {
    let tok = Tokenizer::by_name("char", ["abc"]).unwrap();
    let err = tok.encode("abz").unwrap_err();
    assert!(matches!(err, Error::UnknownChar { ch: 'z' }), "{err}");
    assert!(err.to_string().contains("'z'"), "{err}");
}

#[test]
fn char_decode_names_the_out_of_range_id() {
    let tok = Tokenizer::by_name("char", ["abc"]).unwrap();
    let err = tok.decode(&[0, 3]).unwrap_err();
    assert!(matches!(err, Error::TokenOutOfRange { id: 3, vocab_size: 3 }), "{err}");
}

#[test]
fn char_on_an_empty_corpus_is_an_error() {
    assert!(Tokenizer::by_name("char", [""]).is_err());
}

#[test]
fn char_tokenizer_saves_and_loads_the_same_vocabulary() {
    let corpus = generated_corpus(50, 1) + "日本 🦀\t\r";
    let tok = Tokenizer::by_name("char", [corpus.as_str()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let loaded = Tokenizer::load(&path).unwrap();
    assert_eq!(loaded.kind(), "char");
    assert_eq!(loaded.vocab_size(), tok.vocab_size());
    assert_eq!(loaded.encode(&corpus).unwrap(), tok.encode(&corpus).unwrap());
}

#[test]
fn char_file_with_unsorted_or_bad_entries_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    fs::write(&path, r#"{"ferrite_tokenizer": "char", "chars": ["b", "a"]}"#).unwrap();
    assert_bad_file(Tokenizer::load(&path), &path, "not sorted");
    fs::write(&path, r#"{"ferrite_tokenizer": "char", "chars": ["ab"]}"#).unwrap();
    assert_bad_file(Tokenizer::load(&path), &path, "character");
    fs::write(&path, r#"{"ferrite_tokenizer": "char", "chars": []}"#).unwrap();
    assert_bad_file(Tokenizer::load(&path), &path, "empty");
}

#[test]
fn load_rejects_non_json_unknown_kinds_and_non_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    fs::write(&path, "not json at all").unwrap();
    assert_bad_file(Tokenizer::load(&path), &path, "not JSON");
    fs::write(&path, r#"{"ferrite_tokenizer": "gpt5"}"#).unwrap();
    assert_bad_file(Tokenizer::load(&path), &path, "gpt5");
    fs::write(&path, r#"{"hello": 1}"#).unwrap();
    assert_bad_file(Tokenizer::load(&path), &path, "not a Hugging Face tokenizer");
    let missing = dir.path().join("missing.json");
    let err = Tokenizer::load(&missing).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("missing.json"));
}

#[test]
fn bpe_300_trained_on_a_small_corpus_round_trips_any_text() {
    let corpus = generated_corpus(400, 2);
    let lines: Vec<&str> = corpus.lines().collect();
    let tok = Tokenizer::by_name("bpe:300", lines).unwrap();
    assert_eq!(tok.kind(), "bpe");
    assert_eq!(tok.vocab_size(), 300);
    assert_eq!(tok.eot(), Some(0));
    // Merges learned: the corpus takes fewer tokens than bytes.
    assert!(tok.encode(&corpus).unwrap().len() < corpus.len() / 2);
    // Text far from the corpus still round-trips: every byte is a token.
    let mut texts = varied_strings(200);
    texts.push(corpus);
    assert_round_trips(&tok, &texts);
}

#[test]
fn bpe_tokenizer_saves_in_hugging_face_format_and_loads_back() {
    let corpus = generated_corpus(200, 3);
    let tok = Tokenizer::by_name("bpe:320", [corpus.as_str()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(json["model"]["type"], "BPE");
    let loaded = Tokenizer::load(&path).unwrap();
    assert_eq!(loaded.vocab_size(), tok.vocab_size());
    assert_eq!(loaded.eot(), Some(0));
    for text in varied_strings(50).iter().chain([&corpus]) {
        assert_eq!(loaded.encode(text).unwrap(), tok.encode(text).unwrap());
    }
}

#[test]
fn bpe_below_257_tokens_is_rejected() {
    let err = Tokenizer::by_name("bpe:100", ["abc"]).unwrap_err();
    assert!(err.to_string().contains("at least 257"), "{err}");
}

#[test]
fn bpe_decode_names_the_out_of_range_id() {
    let tok = Tokenizer::by_name("bpe:260", ["aaaa bbbb"]).unwrap();
    let err = tok.decode(&[1, 9999]).unwrap_err();
    assert!(matches!(err, Error::TokenOutOfRange { id: 9999, .. }), "{err}");
}

#[test]
fn byte_level_map_is_a_bijection_onto_the_hugging_face_alphabet() {
    let ours: std::collections::HashSet<char> = (0..=255u8).map(byte_to_char).collect();
    let theirs: std::collections::HashSet<char> =
        tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect();
    assert_eq!(ours, theirs);
    for b in 0..=255u8 {
        assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
    }
    assert_eq!(byte_to_char(b' '), 'Ġ');
    assert_eq!(byte_to_char(b'\n'), 'Ċ');
    assert_eq!(char_to_byte('€'), None);
}
