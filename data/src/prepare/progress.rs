//! Progress reporting for `prepare`, throttled so the callback stays cheap.

/// Reports progress to the caller's callback, at most every [`Progress::EVERY`] bytes.
pub(crate) struct Progress<F> {
    report: F,
    done: u64,
    total: u64,
    reported: u64,
    /// Bytes of one pass, and passes completed.
    pass_len: u64,
    passes_done: u64,
}

impl<F: FnMut(u64, u64)> Progress<F> {
    const EVERY: u64 = 1 << 16;

    pub(crate) fn new(report: F, pass_len: u64, passes: u64) -> Progress<F> {
        let mut p = Progress {
            report,
            done: 0,
            total: pass_len * passes,
            reported: 0,
            pass_len,
            passes_done: 0,
        };
        p.send();
        p
    }

    pub(crate) fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if self.done - self.reported >= Self::EVERY {
            self.send();
        }
    }

    /// Marks a pass complete (a pass may not see every byte, e.g. trailing blank lines).
    pub(crate) fn end_pass(&mut self) {
        self.passes_done += 1;
        self.done = self.passes_done * self.pass_len;
        self.send();
    }

    pub(crate) fn finish(&mut self) {
        self.done = self.total;
        self.send();
    }

    fn send(&mut self) {
        self.reported = self.done;
        (self.report)(self.done.min(self.total), self.total);
    }
}
