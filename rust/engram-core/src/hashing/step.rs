//! Streaming decode: one step of new ids hashed with each sequence's history, which it advances.

use super::*;

impl NgramHasher {
    /// One decode step: hashes `req` (whose `history` is ignored) with `history` as each
    /// sequence's past, then advances `history` past the new ids. On any error `history` is left
    /// as it was (the next history is built apart and copied in last). The `&mut` borrow keeps
    /// anyone else from writing `history` meanwhile; the Python binding passes its own copy.
    pub fn hash_step<I: IdElem, O: OutElem>(
        &self,
        req: &HashRequest<'_, I>,
        history: &mut [i64],
        outs: &mut [&mut [O]],
    ) -> Result<()> {
        let step = HashRequest {
            history: Some(&*history),
            ..*req
        };
        self.hash_segments(&step, outs)?;
        let next = self.advanced_history(history, req)?;
        history.copy_from_slice(&next);
        Ok(())
    }

    /// The compressed id of caller id `b` (mapped through `map` when the ids are raw), or `None`
    /// when it is out of range: the check of every id read outside the vectorised main loop.
    #[inline]
    pub(super) fn compressed(&self, b: u64, map: Option<&[i64]>) -> Option<i64> {
        match map {
            Some(m) => m.get(b as usize).copied(),
            None => (b < self.vocab).then_some(b as i64),
        }
    }

    /// The last `N - 1` compressed ids of each segment's full history (`past` row followed by
    /// the segment's new ids), pad from the newest blocked position back (the DEAD rule: what
    /// follows sees only pad there); every id is checked again, since the caller's array may
    /// have changed since it was hashed.
    fn advanced_history<I: IdElem>(
        &self,
        past: &[i64],
        req: &HashRequest<'_, I>,
    ) -> Result<Vec<i64>> {
        let hist_len = self.max_ngram - 1;
        let map = if req.raw {
            self.lookup.as_deref()
        } else {
            None
        };
        let mut next = past.to_vec();
        for (row, w) in next.chunks_exact_mut(hist_len).zip(req.bounds.windows(2)) {
            // Only the last `N - 1` positions matter, and none before a blocked one.
            let tail = w[0].max(w[1].saturating_sub(hist_len))..w[1];
            let newest_blocked = if req.blocking() {
                tail.clone().rev().find(|&i| req.is_blocked(i))
            } else {
                None
            };
            let start = newest_blocked.map_or(tail.start, |b| b + 1);
            let keep = w[1] - start;
            if newest_blocked.is_some() {
                row.fill(self.pad);
            } else {
                row.rotate_left(keep);
            }
            for (dst, src) in row[hist_len - keep..].iter_mut().zip(&req.ids[start..w[1]]) {
                *dst = self.compressed(src.bits(), map).ok_or_else(ids_changed)?;
            }
        }
        Ok(next)
    }
}
