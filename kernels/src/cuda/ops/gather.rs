//! Row copies driven by host index lists: embedding lookup, gathering rows, and writing new keys and values
//! into their paged-cache slots. The indices were bounds-checked by `crate::ops` before they get here.

use cudarc::driver::PushKernelArg;

use super::launch::{alloc_bf16, alloc_f32};
use crate::{
    cuda::{Buffer, DeviceData, Gpu},
    dtype::DType,
    error::Result,
};

pub(crate) fn embedding(ids: &[u32], table: &Buffer, h: usize) -> Result<Buffer> {
    const OP: &str = "embedding";
    let g = &table.gpu;
    if let DType::Quant(_) = table.dtype() {
        return super::quant::dequantize(table, Some(ids), 0, ids.len(), h, DType::BF16);
    }
    let n = ids.len() * h;
    let mut out = alloc_bf16(g, n)?;
    if n > 0 {
        let dev_ids = g.upload_u32(ids)?;
        let f = g.kernel("embedding_bf16")?;
        let (ni, h64) = (ids.len() as u64, h as u64);
        // SAFETY: ids were bounds-checked against the table's rows by `ops::embedding`.
        unsafe {
            g.stream
                .launch_builder(f)
                .arg(&dev_ids)
                .arg(table.bf16(OP)?)
                .arg(&mut out)
                .arg(&ni)
                .arg(&h64)
                .launch(Gpu::elementwise_cfg(n))
        }
        .map_err(|e| g.err(OP, e))?;
    }
    Ok(Buffer::new(g.clone(), DeviceData::BF16(out)))
}

pub(crate) fn gather_rows(x: &Buffer, rows: &[u32], w: usize) -> Result<Buffer> {
    let g = &x.gpu;
    let n = rows.len() * w;
    let idx = g.upload_u32(rows)?;
    let (nr, w64) = (rows.len() as u64, w as u64);
    let cfg = Gpu::elementwise_cfg(n);
    // SAFETY: row indices were bounds-checked by `ops::gather_rows`.
    let data = match &*x.data {
        DeviceData::BF16(s) => {
            let mut out = alloc_bf16(g, n)?;
            if n > 0 {
                let f = g.kernel("gather_rows_bf16")?;
                unsafe { g.stream.launch_builder(f).arg(s).arg(&idx).arg(&mut out).arg(&nr).arg(&w64).launch(cfg) }
                    .map_err(|e| g.err("gather_rows", e))?;
            }
            DeviceData::BF16(out)
        }
        DeviceData::F32(s) => {
            let mut out = alloc_f32(g, n)?;
            if n > 0 {
                let f = g.kernel("gather_rows_f32")?;
                unsafe { g.stream.launch_builder(f).arg(s).arg(&idx).arg(&mut out).arg(&nr).arg(&w64).launch(cfg) }
                    .map_err(|e| g.err("gather_rows", e))?;
            }
            DeviceData::F32(out)
        }
        DeviceData::Quant(..) => return super::quant::dequantize(x, Some(rows), 0, rows.len(), w, DType::BF16),
    };
    Ok(Buffer::new(g.clone(), data))
}

pub(crate) fn write_kv(
    k: &Buffer,
    v: &Buffer,
    kc: &mut Buffer,
    vc: &mut Buffer,
    slots: &[u32],
    row: usize,
) -> Result<()> {
    const OP: &str = "write_kv_cache";
    let g = k.gpu.clone();
    let n = slots.len() * row;
    if n == 0 {
        return Ok(());
    }
    let dev_slots = g.upload_cached("kv.slots", slots)?;
    let f = g.kernel("write_kv_bf16")?;
    let (t64, r64) = (slots.len() as u64, row as u64);
    let (ks, vs) = (k.bf16(OP)?, v.bf16(OP)?);
    let kcs = kc.bf16_mut(OP)?;
    let vcs = vc.bf16_mut(OP)?;
    // SAFETY: slots were bounds-checked against the cache capacity by `ops::write_kv_cache`.
    unsafe {
        g.stream
            .launch_builder(f)
            .arg(ks)
            .arg(vs)
            .arg(kcs)
            .arg(vcs)
            .arg(&*dev_slots)
            .arg(&t64)
            .arg(&r64)
            .launch(Gpu::elementwise_cfg(n))
    }
    .map_err(|e| g.err(OP, e))?;
    Ok(())
}
