use std::fs;
use std::path::{Path, PathBuf};

use super::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Writes a shard file by hand, so tests can build headers the writers never would.
fn raw_shard(
    dir: &Path,
    name: &str,
    magic: &[u8; 8],
    version: u32,
    width: u32,
    count: u64,
    payload_len: usize,
) -> PathBuf {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&width.to_le_bytes());
    bytes.extend_from_slice(&count.to_le_bytes());
    bytes.extend_from_slice(&[0u8; 8]);
    bytes.resize(HEADER_LEN + payload_len, 7);
    let path = dir.join(name);
    fs::write(&path, bytes).expect("write raw shard");
    path
}

fn write_tokens(path: &Path, width: TokenWidth, tokens: &[u32]) {
    let mut w = ShardWriter::create(path, width).expect("create");
    // Two pushes, so the count accumulates across calls.
    let (a, b) = tokens.split_at(tokens.len() / 2);
    w.push(a).expect("push");
    w.push(b).expect("push");
    assert_eq!(w.finish().expect("finish"), tokens.len() as u64);
}

/// Asserts that opening fails with a `BadShard` error naming the file and containing `what`.
fn assert_bad_shard<T>(result: Result<T>, path: &Path, what: &str) {
    match result {
        Err(e @ Error::BadShard { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "no file name in: {msg}");
            assert!(msg.contains(what), "expected {what:?} in: {msg}");
        }
        Err(e) => panic!("expected BadShard, got {e}"),
        Ok(_) => panic!("expected an error for {}", path.display()),
    }
}

#[test]
fn u16_tokens_round_trip_through_writer_and_reader() {
    let dir = tmp();
    let path = dir.path().join("train.bin");
    let tokens: Vec<u32> = (0..1000).map(|i| (i * 67) % 65536).chain([65535]).collect();
    write_tokens(&path, TokenWidth::U16, &tokens);

    let shard = TokenShard::open(&path).expect("open");
    assert_eq!(shard.width(), TokenWidth::U16);
    assert_eq!(shard.len(), tokens.len());
    assert_eq!(fs::metadata(&path).unwrap().len(), 32 + 2 * tokens.len() as u64);
    assert_eq!(shard.to_vec(), tokens);
    assert_eq!(shard.get(3), tokens[3]);
    let mut window = [0u32; 10];
    shard.read_into(500, &mut window);
    assert_eq!(window, tokens[500..510]);
}

#[test]
fn u32_tokens_round_trip_through_writer_and_reader() {
    let dir = tmp();
    let path = dir.path().join("val.bin");
    let tokens = vec![0, 70_000, u32::MAX, 5];
    write_tokens(&path, TokenWidth::U32, &tokens);
    let shard = TokenShard::open(&path).expect("open");
    assert_eq!(shard.width(), TokenWidth::U32);
    assert_eq!(shard.to_vec(), tokens);
}

#[test]
fn header_bytes_follow_the_documented_layout() {
    let dir = tmp();
    let path = dir.path().join("t.bin");
    write_tokens(&path, TokenWidth::U16, &[1, 258]);
    let bytes = fs::read(&path).unwrap();
    assert_eq!(&bytes[0..8], b"FERRTOK\0");
    assert_eq!(bytes[8..12], 1u32.to_le_bytes());
    assert_eq!(bytes[12..16], 2u32.to_le_bytes());
    assert_eq!(bytes[16..24], 2u64.to_le_bytes());
    assert_eq!(bytes[24..32], [0u8; 8]);
    assert_eq!(bytes[32..], [1, 0, 2, 1]);
}

#[test]
fn empty_shard_opens_with_length_zero() {
    let dir = tmp();
    let path = dir.path().join("val.bin");
    write_tokens(&path, TokenWidth::U16, &[]);
    let shard = TokenShard::open(&path).expect("open");
    assert!(shard.is_empty());
}

#[test]
fn width_for_vocab_switches_to_u32_above_65536() {
    assert_eq!(TokenWidth::for_vocab(50257), TokenWidth::U16);
    assert_eq!(TokenWidth::for_vocab(65536), TokenWidth::U16);
    assert_eq!(TokenWidth::for_vocab(65537), TokenWidth::U32);
}

#[test]
fn pushing_an_id_too_wide_for_u16_is_an_error() {
    let dir = tmp();
    let mut w = ShardWriter::create(&dir.path().join("t.bin"), TokenWidth::U16).unwrap();
    let err = w.push(&[1, 65536]).unwrap_err();
    assert!(err.to_string().contains("65536"), "{err}");
}

#[test]
fn dropped_writer_leaves_no_file_behind() {
    let dir = tmp();
    let path = dir.path().join("train.bin");
    let mut w = ShardWriter::create(&path, TokenWidth::U16).unwrap();
    w.push(&[1, 2, 3]).unwrap();
    drop(w);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn finish_replaces_an_existing_shard() {
    let dir = tmp();
    let path = dir.path().join("train.bin");
    write_tokens(&path, TokenWidth::U16, &[1, 2, 3]);
    write_tokens(&path, TokenWidth::U16, &[9]);
    assert_eq!(TokenShard::open(&path).unwrap().to_vec(), vec![9]);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "temporary file left behind");
}

#[test]
#[should_panic(expected = "out of range")]
fn reading_past_the_end_panics() {
    let dir = tmp();
    let path = dir.path().join("t.bin");
    write_tokens(&path, TokenWidth::U16, &[1, 2, 3]);
    let shard = TokenShard::open(&path).unwrap();
    let mut out = [0u32; 2];
    shard.read_into(2, &mut out);
}

#[test]
fn token_shard_rejects_bad_magic() {
    let dir = tmp();
    let path = raw_shard(dir.path(), "x.bin", b"NOTTOKEN", 1, 2, 1, 2);
    assert_bad_shard(TokenShard::open(&path), &path, "bad magic");
}

#[test]
fn token_shard_opened_as_mask_says_what_it_is() {
    let dir = tmp();
    let path = raw_shard(dir.path(), "train.bin", &TOKEN_MAGIC, 1, 2, 1, 2);
    assert_bad_shard(MaskShard::open(&path), &path, "this is a token shard");
}

#[test]
fn token_shard_rejects_wrong_version() {
    let dir = tmp();
    let path = raw_shard(dir.path(), "x.bin", &TOKEN_MAGIC, 2, 2, 1, 2);
    assert_bad_shard(TokenShard::open(&path), &path, "unsupported format version 2");
}

#[test]
fn token_shard_rejects_bad_width() {
    let dir = tmp();
    let path = raw_shard(dir.path(), "x.bin", &TOKEN_MAGIC, 1, 3, 1, 3);
    assert_bad_shard(TokenShard::open(&path), &path, "bad item width 3");
}

#[test]
fn token_shard_rejects_truncated_payload() {
    let dir = tmp();
    let path = raw_shard(dir.path(), "x.bin", &TOKEN_MAGIC, 1, 2, 10, 19);
    assert_bad_shard(TokenShard::open(&path), &path, "truncated");
}

#[test]
fn token_shard_rejects_file_shorter_than_header() {
    let dir = tmp();
    let path = dir.path().join("x.bin");
    fs::write(&path, b"FERRTOK\0\x01").unwrap();
    assert_bad_shard(TokenShard::open(&path), &path, "shorter than the 32-byte header");
}

#[test]
fn token_shard_rejects_trailing_bytes() {
    let dir = tmp();
    let path = raw_shard(dir.path(), "x.bin", &TOKEN_MAGIC, 1, 4, 2, 9);
    assert_bad_shard(TokenShard::open(&path), &path, "oversized");
}

#[test]
fn token_shard_rejects_count_that_overflows() {
    let dir = tmp();
    let path = raw_shard(dir.path(), "x.bin", &TOKEN_MAGIC, 1, 4, u64::MAX / 2, 0);
    assert_bad_shard(TokenShard::open(&path), &path, "overflows");
}

#[test]
fn token_shard_rejects_nonzero_reserved_bytes() {
    let dir = tmp();
    let path = raw_shard(dir.path(), "x.bin", &TOKEN_MAGIC, 1, 2, 0, 0);
    let mut bytes = fs::read(&path).unwrap();
    bytes[30] = 1;
    fs::write(&path, bytes).unwrap();
    assert_bad_shard(TokenShard::open(&path), &path, "reserved");
}

#[test]
fn missing_shard_is_an_io_error_naming_the_file() {
    let dir = tmp();
    let path = dir.path().join("absent.bin");
    let err = TokenShard::open(&path).err().expect("error");
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("absent.bin"), "{err}");
}

#[test]
fn mask_round_trips_through_writer_and_reader() {
    let dir = tmp();
    let path = dir.path().join("train.mask");
    let mask: Vec<u8> = (0..100).map(|i| u8::from(i % 3 == 0)).collect();
    let mut w = MaskWriter::create(&path).unwrap();
    w.push(&mask[..40]).unwrap();
    w.push(&mask[40..]).unwrap();
    assert_eq!(w.finish().unwrap(), 100);

    let shard = MaskShard::open(&path).unwrap();
    assert_eq!(shard.len(), 100);
    assert_eq!(shard.to_vec(), mask);
    assert_eq!(shard.get(3), 1);
    let mut window = [9u8; 5];
    shard.read_into(10, &mut window);
    assert_eq!(window, mask[10..15]);
    assert_eq!(&fs::read(&path).unwrap()[0..8], b"FERRMSK\0");
}

#[test]
fn mask_writer_rejects_values_other_than_0_and_1() {
    let dir = tmp();
    let mut w = MaskWriter::create(&dir.path().join("m.mask")).unwrap();
    assert!(w.push(&[0, 1, 2]).is_err());
}

#[test]
fn mask_shard_rejects_bad_magic_version_width_and_size() {
    let dir = tmp();
    let d = dir.path();
    let p = raw_shard(d, "a.mask", b"FERRMASK", 1, 1, 4, 4);
    assert_bad_shard(MaskShard::open(&p), &p, "bad magic");
    let p = raw_shard(d, "b.mask", &MASK_MAGIC, 9, 1, 4, 4);
    assert_bad_shard(MaskShard::open(&p), &p, "unsupported format version 9");
    let p = raw_shard(d, "c.mask", &MASK_MAGIC, 1, 2, 4, 8);
    assert_bad_shard(MaskShard::open(&p), &p, "bad item width 2");
    let p = raw_shard(d, "d.mask", &MASK_MAGIC, 1, 1, 4, 3);
    assert_bad_shard(MaskShard::open(&p), &p, "truncated");
}
