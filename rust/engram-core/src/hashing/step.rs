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
        let next = self.advanced_history(history, req.ids, req.bounds, req.raw)?;
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
    /// the segment's new ids); every id is checked again, since the caller's array may have
    /// changed since it was hashed.
    fn advanced_history<I: IdElem>(
        &self,
        past: &[i64],
        ids: &[I],
        bounds: &[usize],
        raw: bool,
    ) -> Result<Vec<i64>> {
        let hist_len = self.max_ngram - 1;
        let map = if raw { self.lookup.as_deref() } else { None };
        let mut next = past.to_vec();
        for (row, w) in next.chunks_exact_mut(hist_len).zip(bounds.windows(2)) {
            let new = &ids[w[0]..w[1]];
            let keep = new.len().min(hist_len);
            row.rotate_left(keep);
            for (dst, src) in row[hist_len - keep..]
                .iter_mut()
                .zip(&new[new.len() - keep..])
            {
                *dst = self.compressed(src.bits(), map).ok_or_else(ids_changed)?;
            }
        }
        Ok(next)
    }
}
