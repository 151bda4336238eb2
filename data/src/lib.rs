//! Tokenizers and token shards (filled in by the data work).
