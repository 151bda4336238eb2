//! Turning sampled tokens into text as they come: whole UTF-8 characters only, cut at the
//! first stop sequence, holding back a tail that could still grow into one. Shared by the
//! server and the local `ferrite generate`, so both cut text the same way.

use ferrite_data::Tokenizer;

/// Decoded output so far.
pub struct TextStream {
    stops: Vec<String>,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl TextStream {
    pub fn new(stops: &[String]) -> Self {
        let stops = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        TextStream { stops, text: String::new(), emitted: 0, stopped: false }
    }

    /// Takes every byte decoded so far and returns the text that became safe to show
    /// (possibly empty); see [`TextStream::stopped`] for whether a stop sequence appeared.
    pub fn advance(&mut self, bytes: &[u8]) -> &str {
        // Hold back an incomplete UTF-8 sequence at the end.
        let valid = match std::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).expect("valid prefix"),
        };
        self.text.clear();
        self.text.push_str(valid);
        if let Some(at) = self.stops.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(at);
            self.stopped = true;
        }
        let hold = if self.stopped {
            0
        } else {
            self.stops.iter().map(|s| partial_suffix(&self.text, s)).max().unwrap_or(0)
        };
        let safe = (self.text.len() - hold).max(self.emitted);
        let from = std::mem::replace(&mut self.emitted, safe);
        &self.text[from..safe]
    }

    /// Whether a stop sequence has appeared (generation should end).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The rest of the text once generation ended (a held-back tail, if no stop came).
    pub fn finish(&mut self) -> &str {
        let from = std::mem::replace(&mut self.emitted, self.text.len());
        &self.text[from.min(self.text.len())..]
    }

    /// The whole kept text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// How many of the generated tokens `ids` the kept text spans.
    pub fn kept_tokens(&self, tok: &Tokenizer, ids: &[u32]) -> Result<usize, ferrite_data::Error> {
        if !self.stopped {
            return Ok(ids.len());
        }
        for n in 0..=ids.len() {
            if tok.decode_bytes(&ids[..n])?.len() >= self.text.len() {
                return Ok(n);
            }
        }
        Ok(ids.len())
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&n| n <= text.len() && stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_a_possible_stop_and_cuts_at_a_real_one() {
        let mut s = TextStream::new(&["END".to_string()]);
        assert_eq!(s.advance(b"abc E"), "abc ");
        assert_eq!(s.advance(b"abc EN"), "");
        assert_eq!(s.advance(b"abc ENx"), "ENx");
        assert!(!s.stopped());
        assert_eq!(s.advance(b"abc ENx yEND z"), " y");
        assert!(s.stopped());
        assert_eq!(s.text(), "abc ENx y");
    }

    #[test]
    fn incomplete_utf8_waits_for_its_last_byte() {
        let mut s = TextStream::new(&[]);
        let e = "é".as_bytes();
        assert_eq!(s.advance(&[b'a', e[0]]), "a");
        assert_eq!(s.advance(&[b'a', e[0], e[1]]), "é");
        assert_eq!(s.finish(), "");
    }
}
