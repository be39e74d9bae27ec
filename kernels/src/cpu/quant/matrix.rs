//! A weight matrix in a block format as the CPU keeps it ([`QuantMatrix`]), and the interleaved layout its
//! rows take where the CPU has kernels for it ([`super::interleaved`]).
//!
//! In that layout each run of [`GROUP_ROWS`] rows is stored block column by block column, and within a
//! column region by region of the block ([`regions`]): a field (a step, a byte of packed scales) as the
//! eight rows' copies side by side, the quants four bytes of a row at a time (bytes 0..4 of rows 0..8,
//! bytes 4..8 of rows 0..8, …). One 32-byte load then holds four consecutive quants of each of eight rows,
//! which one `vpdpbusd` against four broadcast activation bytes sums into one lane per row, and one load
//! holds a field for all eight. llama.cpp's CPU backend repacks Q4_0, Q8_0 and Q4_K for the same reason;
//! this arrangement is ours. It takes exactly the bytes the rows took (a group occupies its rows' place),
//! and the rows after the last whole group stay as they were in the file.

use std::borrow::Cow;

use tessera_gguf::{GgmlType, QuantError};

/// Rows interleaved in one group.
pub const GROUP_ROWS: usize = 8;

/// Bytes of one row's quants taken at a time.
const PIECE: usize = 4;

/// A run of a block's bytes, as the interleaved layout arranges it.
#[derive(Clone, Copy, Debug)]
pub enum Region {
    /// `count` fields of `len` bytes each: each field's eight rows' copies one after another.
    Fields { count: usize, len: usize },
    /// Quants, this many bytes: [`PIECE`] bytes of each row in turn.
    Pieces(usize),
}

impl Region {
    fn len(self) -> usize {
        match self {
            Region::Fields { count, len } => count * len,
            Region::Pieces(n) => n,
        }
    }
}

/// One f16 step (or minimum).
const F16: Region = Region::Fields { count: 1, len: 2 };

/// The regions of a `ty` block in file order, covering it (empty for a format that does not interleave).
pub fn regions(ty: GgmlType) -> &'static [Region] {
    use Region::*;
    match ty {
        GgmlType::Q8_0 => &[F16, Pieces(32)],
        GgmlType::Q4_0 => &[F16, Pieces(16)],
        // d, dmin, then each of the twelve bytes of packed 6-bit scales and minimums as a field of its own,
        // so one load gives a byte of all eight rows' scales.
        GgmlType::Q4_K => &[F16, F16, Fields { count: 12, len: 1 }, Pieces(128)],
        // Low nibbles, high bits, then each sub-block's scale as a field of its own, then d.
        GgmlType::Q6_K => &[Pieces(128), Pieces(64), Fields { count: 16, len: 1 }, F16],
        _ => &[],
    }
}

/// A `[rows, cols]` matrix of `ty` blocks.
#[derive(Debug)]
pub struct QuantMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// Rows in the interleaved layout (a multiple of [`GROUP_ROWS`]); the rest follow as in the file.
    packed_rows: usize,
    bytes: Vec<u8>,
}

/// Whether rows of `ty` are interleaved on this CPU.
fn interleaves(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::interleaved::available(ty);
    #[cfg(not(target_arch = "x86_64"))]
    return {
        let _ = ty;
        false
    };
}

impl QuantMatrix {
    /// The matrix whose rows `bytes` holds in the file's layout. The caller has checked that `bytes` is
    /// `rows` rows of `cols / block_size` blocks.
    pub fn new(ty: GgmlType, mut bytes: Vec<u8>, rows: usize, cols: usize) -> Self {
        debug_assert_eq!(bytes.len(), rows * super::row_bytes(ty, cols));
        let packed_rows = if interleaves(ty) { rows / GROUP_ROWS * GROUP_ROWS } else { 0 };
        let group = GROUP_ROWS * super::row_bytes(ty, cols);
        if packed_rows > 0 {
            let mut scratch = vec![0u8; group];
            for g in bytes[..packed_rows / GROUP_ROWS * group].chunks_exact_mut(group) {
                scratch.copy_from_slice(g);
                pack_group(ty, &scratch, g);
            }
        }
        QuantMatrix { ty, rows, cols, packed_rows, bytes }
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (those of the file's layout: interleaving moves bytes, it adds none).
    pub fn size_in_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Rows held interleaved, from the first; a multiple of [`GROUP_ROWS`].
    pub fn packed_rows(&self) -> usize {
        self.packed_rows
    }

    /// The bytes as held: interleaved groups, then the remaining rows in the file's layout.
    pub fn raw(&self) -> &[u8] {
        &self.bytes
    }

    fn row_bytes(&self) -> usize {
        super::row_bytes(self.ty, self.cols)
    }

    /// Row `i`'s blocks in the file's layout, written to `dst` (one row's bytes).
    pub fn row_blocks_into(&self, i: usize, dst: &mut [u8]) {
        let rb = self.row_bytes();
        if i < self.packed_rows {
            let g = i / GROUP_ROWS * GROUP_ROWS * rb;
            gather_row(self.ty, &self.bytes[g..g + GROUP_ROWS * rb], i % GROUP_ROWS, dst);
        } else {
            dst.copy_from_slice(&self.bytes[i * rb..(i + 1) * rb]);
        }
    }

    /// Rows `[r0, r1)` in the file's layout: borrowed where they are held that way.
    pub fn blocks(&self, r0: usize, r1: usize) -> Cow<'_, [u8]> {
        let rb = self.row_bytes();
        if r0 >= self.packed_rows {
            return Cow::Borrowed(&self.bytes[r0 * rb..r1 * rb]);
        }
        let mut out = vec![0u8; (r1 - r0) * rb];
        for (i, dst) in (r0..r1).zip(out.chunks_exact_mut(rb)) {
            self.row_blocks_into(i, dst);
        }
        Cow::Owned(out)
    }

    /// Rows `[r0, r1)` decoded to f32 into `out` (`(r1 − r0) · cols` values).
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) -> Result<(), QuantError> {
        if r0 >= self.packed_rows {
            let rb = self.row_bytes();
            return tessera_gguf::dequantize(self.ty, &self.bytes[r0 * rb..r1 * rb], out);
        }
        let mut row = vec![0u8; self.row_bytes()];
        for (i, dst) in (r0..r1).zip(out.chunks_exact_mut(self.cols)) {
            self.row_blocks_into(i, &mut row);
            tessera_gguf::dequantize(self.ty, &row, dst)?;
        }
        Ok(())
    }
}

/// Calls `each(file, interleaved, len)` for every run of `len` bytes that row `r`'s block in column `b`
/// keeps together: `file` its offset in the block, `interleaved` its offset in the group's bytes.
fn runs(ty: GgmlType, b: usize, r: usize, mut each: impl FnMut(usize, usize, usize)) {
    let column = b * GROUP_ROWS * ty.type_size();
    let (mut file, mut base) = (0, column);
    for &region in regions(ty) {
        match region {
            Region::Fields { count, len } => {
                for f in 0..count {
                    each(file + f * len, base + (f * GROUP_ROWS + r) * len, len);
                }
            }
            Region::Pieces(n) => {
                for p in 0..n / PIECE {
                    each(file + p * PIECE, base + (p * GROUP_ROWS + r) * PIECE, PIECE);
                }
            }
        }
        file += region.len();
        base += GROUP_ROWS * region.len();
    }
    debug_assert_eq!(file, ty.type_size());
}

/// Interleaves a group's rows (`src`, file layout) into `dst`.
fn pack_group(ty: GgmlType, src: &[u8], dst: &mut [u8]) {
    let (bs, rb) = (ty.type_size(), src.len() / GROUP_ROWS);
    for (r, row) in src.chunks_exact(rb).enumerate() {
        for (b, block) in row.chunks_exact(bs).enumerate() {
            runs(ty, b, r, |file, at, n| dst[at..at + n].copy_from_slice(&block[file..file + n]));
        }
    }
}

/// Row `r` of an interleaved group, in the file's layout.
fn gather_row(ty: GgmlType, group: &[u8], r: usize, dst: &mut [u8]) {
    for (b, block) in dst.chunks_exact_mut(ty.type_size()).enumerate() {
        runs(ty, b, r, |file, at, n| block[file..file + n].copy_from_slice(&group[at..at + n]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte lands in a distinct place inside the group, and each row comes back as it went, for
    /// every format that interleaves; the rows after the last group are untouched.
    #[test]
    fn interleaving_moves_every_byte_and_rows_come_back() {
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K] {
            let (rows, cols) = (19, 512);
            let rb = super::super::row_bytes(ty, cols);
            let bytes: Vec<u8> = (0..rows * rb).map(|i| (i * 7 + i / 251) as u8).collect();
            let m = QuantMatrix::new(ty, bytes.clone(), rows, cols);
            assert_eq!(m.size_in_bytes(), bytes.len());
            assert_eq!(m.blocks(0, rows), bytes.as_slice(), "{ty}");
            assert_eq!(m.blocks(5, 17), &bytes[5 * rb..17 * rb], "{ty}");
            let mut seen = vec![0u8; GROUP_ROWS * rb];
            for r in 0..GROUP_ROWS {
                for b in 0..cols / ty.block_size() {
                    runs(ty, b, r, |_, at, n| seen[at..at + n].iter_mut().for_each(|s| *s += 1));
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{ty}: every byte of the group once");
            if m.packed_rows() > 0 {
                assert_eq!(m.packed_rows(), 16);
                assert_ne!(&m.raw()[..rb], &bytes[..rb], "{ty}: the first group is interleaved");
            }
            assert_eq!(&m.raw()[16 * rb..], &bytes[16 * rb..], "{ty}: the tail stays as it was");
        }
    }
}
