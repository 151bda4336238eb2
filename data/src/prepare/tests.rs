use std::fs;
use std::path::{Path, PathBuf};

use super::*;
use crate::dataset::Dataset;
use crate::test_support::generated_corpus;

/// Runs `prepare`, checking that progress only grows and ends at the total.
fn run(opts: &PrepareOptions) -> Result<PrepareSummary> {
    let mut calls: Vec<(u64, u64)> = Vec::new();
    let summary = prepare(opts, |done, total| calls.push((done, total)))?;
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 == w[1].1), "{calls:?}");
    let &(done, total) = calls.last().expect("progress was reported");
    assert_eq!(done, total);
    Ok(summary)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

fn jsonl_line(prompt: &str, completion: &str) -> String {
    serde_json::json!({"prompt": prompt, "completion": completion}).to_string() + "\n"
}

#[test]
fn gpt2_text_shards_are_the_whole_files_encoded_with_eot_after_each() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (generated_corpus(60, 10), generated_corpus(40, 11) + "日本語 🦀\r\n");
    let inputs = vec![write(dir.path(), "a.txt", &a), write(dir.path(), "b.txt", &b)];
    let out = dir.path().join("ds");
    let mut opts = PrepareOptions::new("gpt2", &out, inputs);
    // Small reads, so files span many chunks and the split lands inside one.
    opts.chunk_bytes = 50;
    let summary = run(&opts).unwrap();

    let tok = Tokenizer::gpt2();
    let mut expected = tok.encode(&a).unwrap();
    expected.push(50256);
    expected.extend(tok.encode(&b).unwrap());
    expected.push(50256);
    let ds = Dataset::open(&out).unwrap();
    let mut all = ds.train.to_vec();
    all.extend(ds.val.to_vec());
    assert_eq!(all, expected);
    assert_eq!(ds.train.width(), TokenWidth::U16);
    assert!(ds.train_mask.is_none());
    assert_eq!(ds.tokenizer.kind(), "gpt2");
    assert_eq!(summary.train_tokens, ds.train.len() as u64);
    assert_eq!(summary.val_tokens, ds.val.len() as u64);
    assert_eq!((summary.vocab_size, summary.input_files), (50257, 2));
}

#[test]
fn val_is_about_the_last_fraction_of_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = generated_corpus(500, 12);
    let input = write(dir.path(), "c.txt", &corpus);
    let out = dir.path().join("ds");
    let mut opts = PrepareOptions::new("char", &out, vec![input]);
    opts.val_fraction = 0.2;
    run(&opts).unwrap();
    let ds = Dataset::open(&out).unwrap();
    let val_text = ds.tokenizer.decode(&ds.val.to_vec()).unwrap();
    let train_text = ds.tokenizer.decode(&ds.train.to_vec()).unwrap();
    assert_eq!(train_text + &val_text, corpus);
    let wanted = corpus.len() / 5;
    // The split moves forward to the next whitespace cut: within a word of the target.
    assert!(val_text.len() <= wanted && val_text.len() + 20 > wanted, "{}", val_text.len());
}

#[test]
fn zero_val_fraction_writes_an_empty_val_shard() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "c.txt", "to be or not to be\n");
    let out = dir.path().join("ds");
    let mut opts = PrepareOptions::new("gpt2", &out, vec![input]);
    opts.val_fraction = 0.0;
    let summary = run(&opts).unwrap();
    assert_eq!(summary.val_tokens, 0);
    assert!(Dataset::open(&out).unwrap().val.is_empty());
}

#[test]
fn char_dataset_vocabulary_comes_from_the_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    fs::create_dir_all(corpus_dir.join("sub")).unwrap();
    write(&corpus_dir, "b.txt", "bbb\n");
    write(&corpus_dir.join("sub"), "a.txt", "héllo\n");
    let out = dir.path().join("ds");
    let summary = run(&PrepareOptions::new("char", &out, vec![corpus_dir])).unwrap();
    // Distinct characters: '\n' b h l o é
    assert_eq!(summary.vocab_size, 6);
    assert_eq!(summary.train_tokens + summary.val_tokens, 10);
    let ds = Dataset::open(&out).unwrap();
    let mut all = ds.train.to_vec();
    all.extend(ds.val.to_vec());
    // Files in sorted path order ("b.txt" < "sub/"), no separator for `char`.
    assert_eq!(ds.tokenizer.decode(&all).unwrap(), "bbb\nhéllo\n");
}

#[test]
fn bpe_dataset_decodes_back_to_the_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = generated_corpus(300, 13);
    let input = write(dir.path(), "c.txt", &corpus);
    let out = dir.path().join("ds");
    let mut opts = PrepareOptions::new("bpe:300", &out, vec![input]);
    opts.chunk_bytes = 200;
    let summary = run(&opts).unwrap();
    assert_eq!(summary.vocab_size, 300);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.tokenizer.kind(), "bpe");
    let mut all = ds.train.to_vec();
    all.extend(ds.val.to_vec());
    assert_eq!(all.pop(), Some(0), "the document ends with end-of-text");
    assert_eq!(ds.tokenizer.decode(&all).unwrap(), corpus);
    assert_eq!(all, ds.tokenizer.encode(&corpus).unwrap());
}

#[test]
fn an_existing_tokenizer_file_can_be_reused() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "c.txt", "abcabc\n");
    let tok_path = dir.path().join("tok.json");
    Tokenizer::by_name("char", ["abc\nxyz"]).unwrap().save(&tok_path).unwrap();
    let out = dir.path().join("ds");
    let summary = run(&PrepareOptions::new(tok_path.to_str().unwrap(), &out, vec![input])).unwrap();
    assert_eq!(summary.vocab_size, 7);
}

#[test]
fn text_a_loaded_char_tokenizer_cannot_encode_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "odd.txt", "abq\n");
    let tok_path = dir.path().join("tok.json");
    Tokenizer::by_name("char", ["ab\n"]).unwrap().save(&tok_path).unwrap();
    let out = dir.path().join("ds");
    let err = run(&PrepareOptions::new(tok_path.to_str().unwrap(), &out, vec![input])).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("odd.txt") && msg.contains("'q'"), "{msg}");
}

#[test]
fn non_utf8_input_fails_naming_the_file_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.txt", "fine text\n");
    let bad = dir.path().join("bad.txt");
    fs::write(&bad, b"caf\xe9\n").unwrap();
    let out = dir.path().join("ds");
    for tokenizer in ["gpt2", "char"] {
        let opts = PrepareOptions::new(tokenizer, &out, vec![good.clone(), bad.clone()]);
        let err = run(&opts).unwrap_err();
        assert!(matches!(err, Error::NotUtf8 { offset: 3, .. }), "{tokenizer}: {err}");
        assert!(err.to_string().contains("bad.txt"), "{err}");
        let left: Vec<_> = fs::read_dir(&out).unwrap().collect();
        assert!(left.is_empty(), "{tokenizer}: files left behind: {left:?}");
    }
}

#[test]
fn bad_options_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "c.txt", "text\n");
    let out = dir.path().join("ds");
    let mut opts = PrepareOptions::new("gpt2", &out, vec![input.clone()]);
    opts.val_fraction = 1.0;
    assert!(run(&opts).unwrap_err().to_string().contains("val_fraction"));
    let opts = PrepareOptions::new("wordpiece", &out, vec![input]);
    assert!(matches!(run(&opts).unwrap_err(), Error::UnknownTokenizer(_)));
    let empty = write(dir.path(), "empty.txt", "");
    let opts = PrepareOptions::new("gpt2", &out, vec![empty]);
    assert!(run(&opts).unwrap_err().to_string().contains("empty"));
}

#[test]
fn jsonl_masks_prompt_tokens_and_targets_completion_and_eot() {
    let dir = tempfile::tempdir().unwrap();
    let examples = [("Q: 2+2?", " A: 4"), ("Hello", " world"), ("x", "y"), ("Say hi", " hi")];
    let text: String = examples.iter().map(|(p, c)| jsonl_line(p, c)).collect();
    let input = write(dir.path(), "ft.jsonl", &text);
    let out = dir.path().join("ds");
    let mut opts = PrepareOptions::new("gpt2", &out, vec![input]);
    opts.format = InputFormat::Jsonl;
    opts.val_fraction = 0.25;
    let summary = run(&opts).unwrap();
    assert_eq!((summary.train_examples, summary.val_examples), (3, 1));

    let tok = Tokenizer::gpt2();
    let (mut tokens, mut mask) = (Vec::new(), Vec::new());
    for (p, c) in examples {
        let (p, c) = (tok.encode(p).unwrap(), tok.encode(c).unwrap());
        mask.extend(std::iter::repeat_n(0u8, p.len()));
        mask.extend(std::iter::repeat_n(1u8, c.len() + 1));
        tokens.extend(p);
        tokens.extend(c);
        tokens.push(50256);
    }
    let ds = Dataset::open(&out).unwrap();
    let (train_mask, val_mask) = (ds.train_mask.unwrap(), ds.val_mask.unwrap());
    let n_train = ds.train.len();
    assert_eq!(ds.train.to_vec(), tokens[..n_train]);
    assert_eq!(ds.val.to_vec(), tokens[n_train..]);
    assert_eq!(train_mask.to_vec(), mask[..n_train]);
    assert_eq!(val_mask.to_vec(), mask[n_train..]);
    // The last example alone is in val: "Say hi" then " hi" and end-of-text.
    let val_example = [tok.encode("Say hi").unwrap(), tok.encode(" hi").unwrap()].concat();
    assert_eq!(ds.val.to_vec()[..val_example.len()], val_example);
}

#[test]
fn jsonl_with_char_tokenizer_has_no_eot_and_learns_from_prompt_and_completion() {
    let dir = tempfile::tempdir().unwrap();
    let text = jsonl_line("ab", "cd") + "\n" + &jsonl_line("é", "");
    let input = write(dir.path(), "ft.jsonl", &text);
    let out = dir.path().join("ds");
    let mut opts = PrepareOptions::new("char", &out, vec![input]);
    opts.format = InputFormat::Jsonl;
    let summary = run(&opts).unwrap();
    // Characters of the texts only, not of the JSON around them.
    assert_eq!(summary.vocab_size, 5);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.train.to_vec(), vec![0, 1, 2, 3]);
    assert_eq!(ds.train_mask.unwrap().to_vec(), vec![0, 0, 1, 1]);
    assert_eq!(ds.val.to_vec(), vec![4]);
    assert_eq!(ds.val_mask.unwrap().to_vec(), vec![0]);
}

#[test]
fn malformed_jsonl_line_fails_naming_file_and_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let text = jsonl_line("a", "b") + &jsonl_line("c", "d") + "{\"prompt\": \"e\"}\n";
    let input = write(dir.path(), "ft.jsonl", &text);
    let out = dir.path().join("ds");
    let mut opts = PrepareOptions::new("gpt2", &out, vec![input]);
    opts.format = InputFormat::Jsonl;
    let err = run(&opts).unwrap_err();
    assert!(matches!(err, Error::BadJsonl { line: 3, .. }), "{err}");
    assert!(err.to_string().contains("ft.jsonl:3:"), "{err}");
    assert_eq!(fs::read_dir(&out).unwrap().count(), 0);
}

#[test]
fn a_single_jsonl_example_all_goes_to_train() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "ft.jsonl", &jsonl_line("a", "b"));
    let out = dir.path().join("ds");
    let mut opts = PrepareOptions::new("gpt2", &out, vec![input]);
    opts.format = InputFormat::Jsonl;
    let summary = run(&opts).unwrap();
    assert_eq!((summary.train_examples, summary.val_examples), (1, 0));
}

#[test]
fn text_prepare_removes_masks_left_by_an_earlier_jsonl_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let jsonl = write(dir.path(), "ft.jsonl", &(jsonl_line("a", "b") + &jsonl_line("c", "d")));
    let mut opts = PrepareOptions::new("gpt2", &out, vec![jsonl]);
    opts.format = InputFormat::Jsonl;
    run(&opts).unwrap();
    assert!(out.join("train.mask").exists());
    let text = write(dir.path(), "c.txt", "plain text now\n");
    run(&PrepareOptions::new("gpt2", &out, vec![text])).unwrap();
    let ds = Dataset::open(&out).unwrap();
    assert!(ds.train_mask.is_none() && ds.val_mask.is_none());
}

#[test]
fn val_example_count_rounds_and_keeps_both_splits_nonempty() {
    assert_eq!(val_example_count(10, 0.1), 1);
    assert_eq!(val_example_count(10, 0.0), 0);
    assert_eq!(val_example_count(2, 0.01), 1);
    assert_eq!(val_example_count(2, 0.9), 1);
    assert_eq!(val_example_count(1, 0.5), 0);
    assert_eq!(val_example_count(1000, 0.25), 250);
}
