//! Runs the built `ferrite` binary for the data commands.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use ferrite_data::{Dataset, TokenShard};

fn ferrite(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferrite");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.unwrap_or("").as_bytes()).expect("write stdin");
    drop(input);
    child.wait_with_output().expect("wait for ferrite")
}

fn stdout_ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ferrite failed: {stderr}");
    String::from_utf8(out.stdout.clone()).expect("UTF-8 stdout")
}

#[test]
fn tokenize_prints_gpt2_ids_of_hello_world() {
    let out = ferrite(&["tokenize", "--tokenizer", "gpt2", "Hello world"], None);
    assert_eq!(stdout_ok(&out), "15496 995\n");
}

#[test]
fn tokenize_reads_stdin_when_no_text_is_given() {
    let out = ferrite(&["tokenize", "--tokenizer", "gpt2"], Some("Hello world"));
    assert_eq!(stdout_ok(&out), "15496 995\n");
}

#[test]
fn detokenize_inverts_tokenize_from_args_and_stdin() {
    let text = "Ferrite says: héllo, 世界 🦀";
    let ids = stdout_ok(&ferrite(&["tokenize", text], None));
    let mut args = vec!["detokenize", "--tokenizer", "gpt2"];
    args.extend(ids.split_whitespace());
    assert_eq!(stdout_ok(&ferrite(&args, None)), format!("{text}\n"));
    let from_stdin = ferrite(&["detokenize"], Some(&ids));
    assert_eq!(stdout_ok(&from_stdin), format!("{text}\n"));
    assert_eq!(stdout_ok(&ferrite(&["detokenize", "15496", "995"], None)), "Hello world\n");
}

#[test]
fn detokenize_rejects_an_id_outside_the_vocabulary() {
    let out = ferrite(&["detokenize", "15496", "60000"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("60000"));
}

#[test]
fn data_prepare_char_writes_shards_that_open() {
    let dir = tempfile::tempdir().unwrap();
    let corpus: String = (0..200).map(|i| format!("line {i}: to be or not to be\n")).collect();
    std::fs::write(dir.path().join("corpus.txt"), &corpus).unwrap();
    let out_dir = dir.path().join("ds");
    let out = ferrite(
        &[
            "data",
            "prepare",
            "--tokenizer",
            "char",
            "--val-fraction",
            "0.1",
            "--out",
            out_dir.to_str().unwrap(),
            dir.path().join("corpus.txt").to_str().unwrap(),
        ],
        None,
    );
    let summary = stdout_ok(&out);
    let train = TokenShard::open(&out_dir.join("train.bin")).unwrap();
    let val = TokenShard::open(&out_dir.join("val.bin")).unwrap();
    assert_eq!(train.len() + val.len(), corpus.chars().count());
    assert!(!val.is_empty() && val.len() < corpus.len() / 5);
    assert!(summary.contains(&format!("{} train tokens", train.len())), "{summary}");
    assert!(summary.contains(&format!("{} val tokens", val.len())), "{summary}");
    let ds = Dataset::open(&out_dir).unwrap();
    assert!(summary.contains(&format!("vocab size {}", ds.tokenizer.vocab_size())));

    // The written tokenizer.json works with tokenize/detokenize.
    let tok = out_dir.join("tokenizer.json");
    let tok = tok.to_str().unwrap();
    let ids = stdout_ok(&ferrite(&["tokenize", "--tokenizer", tok, "to be"], None));
    let mut args = vec!["detokenize", "--tokenizer", tok];
    args.extend(ids.split_whitespace());
    assert_eq!(stdout_ok(&ferrite(&args, None)), "to be\n");
}

#[test]
fn data_prepare_jsonl_reports_the_malformed_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("ft.jsonl");
    let lines = "{\"prompt\": \"a\", \"completion\": \"b\"}\n\
                 {\"prompt\": \"c\", \"completion\": \"d\"}\n\
                 {\"prompt\": \"e\", \"completion\": 7}\n";
    std::fs::write(&input, lines).unwrap();
    let out_dir = dir.path().join("ds");
    let out = ferrite(
        &[
            "data",
            "prepare",
            "--tokenizer",
            "gpt2",
            "--format",
            "jsonl",
            "--out",
            out_dir.to_str().unwrap(),
            input.to_str().unwrap(),
        ],
        None,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ft.jsonl:3:"), "{stderr}");
    assert!(!Path::new(&out_dir.join("train.bin")).exists());
}
