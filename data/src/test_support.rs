//! Generated inputs shared by the unit tests: no test depends on a corpus on disk.

/// A tiny deterministic generator (an LCG), so failures reproduce.
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Lcg {
        Lcg(seed)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// Pieces that stress byte-level tokenizers: multi-byte characters, emoji with modifiers and
/// joiners, combining marks, runs of spaces, tabs and newlines, contractions, digits.
const FRAGMENTS: &[&str] = &[
    "Hello",
    " world",
    "\n",
    "\n\n",
    "   ",
    "\t",
    " \n ",
    "🦀",
    "日本語のテキスト",
    "😀👍🏽",
    "👩\u{200d}💻",
    "naïve café",
    "a\u{301}",
    "  trailing  ",
    "'s",
    "'ll",
    " 12345",
    "3.14",
    "\r\n",
    "ℵ₀",
    "Ελληνικά",
    "<|endoftext|>",
    "\u{a0}",
    "x",
    ",.;!?",
    "\u{feff}",
];

/// Strings built from random runs of [`FRAGMENTS`], plus the empty string.
pub fn varied_strings(n: usize) -> Vec<String> {
    let mut rng = Lcg::new(7);
    let mut out = vec![String::new()];
    for _ in 0..n {
        let parts = 1 + rng.below(8);
        out.push((0..parts).map(|_| FRAGMENTS[rng.below(FRAGMENTS.len())]).collect());
    }
    out
}

const WORDS: &[&str] = &[
    "the", "king", "queen", "shall", "speak", "of", "love", "and", "war", "thou", "art", "noble",
    "my", "lord", "what", "is", "this", "night", "sweet", "good", "morrow",
];

/// `lines` lines of pseudo-English, each ending in a newline, with a speaker line now and
/// then (like a play).
pub fn generated_corpus(lines: usize, seed: u64) -> String {
    let mut rng = Lcg::new(seed);
    let mut out = String::new();
    for i in 0..lines {
        if i % 7 == 0 {
            out.push_str("KING:\n");
        }
        let words = 3 + rng.below(8);
        for w in 0..words {
            if w > 0 {
                out.push(' ');
            }
            out.push_str(WORDS[rng.below(WORDS.len())]);
        }
        out.push_str(if rng.below(4) == 0 { "?\n" } else { ".\n" });
    }
    out
}
