//! Token embedding (shaders/embedding.wgsl): out = table[ids]; its backward is a deterministic
//! scatter-add of rows by id, grouped on the host (CSR), without atomics.

use crate::autograd::{Op, Tape, Var};
use crate::gpu::{groups_2d, groups_for, shaders, DType, GpuContext, HostRows, Kernel, RowShards, Tensor};
use crate::ops::expect_rank;
use crate::{Error, Result};

const FORWARD: Kernel = shaders::kernel(shaders::EMBEDDING, "embedding_forward", &["table", "ids", "out"]);
const BACKWARD: Kernel = shaders::kernel(shaders::EMBEDDING, "embedding_backward", &["ids", "offsets", "pos", "dout", "out"]);
const FORWARD16: Kernel = shaders::kernel(shaders::EMBEDDING, "embedding_forward16", &["ids", "out", "table16"]);
const WIDEN16: Kernel = shaders::kernel(shaders::EMBEDDING, "embedding_widen16", &["out", "table16"]);
/// Every kernel this op launches (tests/shaders.rs checks their bindings against the WGSL).
pub(crate) const KERNELS: &[Kernel] = &[FORWARD, BACKWARD, FORWARD16, WIDEN16];
/// Workgroup size of shaders/embedding.wgsl (`WG` there).
pub const WG: u32 = 128;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    c: u32,
    v: u32,
    row0: u32,
    kind: u32,
    scales: u32,
    _pad: [u32; 2],
}

impl Params {
    fn new(n: usize, c: usize, v: usize) -> Self {
        Params { n: n as u32, c: c as u32, v: v as u32, row0: 0, kind: 0, scales: 0, _pad: [0; 2] }
    }

    /// Sets `kind` (and, for Q8, the word offset of the scales) for a compact table part of
    /// `numel` values.
    fn compact(mut self, dtype: DType, numel: usize) -> Result<Self> {
        self.kind = kind16(dtype)?;
        self.scales = (numel / 4) as u32;
        Ok(self)
    }
}

/// The `kind` of a 16-bit table in shaders/embedding.wgsl.
fn kind16(d: DType) -> Result<u32> {
    match d {
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        DType::Q8 => Ok(3),
        other => Err(Error::Invalid(format!("embedding: a {other:?} table is not 16-bit or Q8"))),
    }
}

/// Token positions grouped by id (CSR): the positions of `uniq[u]` are
/// `pos[offsets[u]..offsets[u + 1]]`, ascending; `uniq` is ascending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdGroups {
    /// Distinct ids, ascending (U).
    pub uniq: Vec<u32>,
    /// Start of each id's positions in `pos`, plus the end (U + 1).
    pub offsets: Vec<u32>,
    /// Token positions grouped by id (N).
    pub pos: Vec<u32>,
}

/// Groups the positions 0..N of `ids` (N) by id (a stable sort of the positions by id).
pub fn group_ids(ids: &[u32]) -> IdGroups {
    let mut pos: Vec<u32> = (0..ids.len() as u32).collect();
    pos.sort_by_key(|&p| ids[p as usize]); // stable: positions stay ascending within an id
    let mut uniq = Vec::new();
    let mut offsets = Vec::new();
    for (k, &p) in pos.iter().enumerate() {
        let id = ids[p as usize];
        if uniq.last() != Some(&id) {
            uniq.push(id);
            offsets.push(k as u32);
        }
    }
    offsets.push(pos.len() as u32);
    IdGroups { uniq, offsets, pos }
}

/// Checks that every id is below `v`; the error names the first bad position.
pub fn check_ids(ids: &[u32], v: usize) -> Result<()> {
    if let Some((n, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
        return Err(Error::Invalid(format!("embedding: id {id} at position {n} is outside the vocabulary [0, {v})")));
    }
    Ok(())
}

fn table_dims(table_shape: &[usize]) -> Result<(usize, usize)> {
    let s = expect_rank("embedding", "table", table_shape, 2)?;
    Ok((s[0], s[1]))
}

fn check_u32(what: &str, n: usize) -> Result<()> {
    if n > u32::MAX as usize {
        return Err(Error::shape("embedding", format!("{what} of {n} elements exceeds u32 indexing")));
    }
    Ok(())
}

/// Forward: out (N, C) = table (V, C) [ids (N)]. Ids outside [0, V) are an error before any dispatch.
pub fn forward(ctx: &GpuContext, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let (v, c) = table_dims(table.shape())?;
    check_ids(ids, v)?;
    let n = ids.len();
    check_u32("table", v * c)?;
    check_u32("output", n * c)?;
    let out = ctx.empty(&[n, c], DType::F32)?;
    if n * c == 0 {
        return Ok(out);
    }
    gather_into(ctx, table, &ctx.upload_u32(ids, &[n])?, &out)?;
    Ok(out)
}

/// out (N, C) = table (V, C) [ids_t (N)] with the ids already on the device (checked by the
/// caller against V).
pub(crate) fn gather_into(ctx: &GpuContext, table: &Tensor, ids_t: &Tensor, out: &Tensor) -> Result<()> {
    let (v, c) = table_dims(table.shape())?;
    let n = ids_t.numel();
    let p = Params::new(n, c, v);
    ctx.dispatch(&FORWARD, &p, &[table, ids_t, out], groups_2d(groups_for(n * c, WG as usize)))
}

/// Forward from a row-sharded table of any storage (f32, bf16, f16): out (N, C) f32 =
/// table (V, C) [ids (N)], one dispatch per shard (each writes the positions whose id it holds).
pub fn forward_shards(ctx: &GpuContext, table: &RowShards, ids: &[u32]) -> Result<Tensor> {
    if let Some(t) = table.as_single_f32() {
        return forward(ctx, t, ids);
    }
    let (v, c) = (table.rows(), table.cols());
    check_ids(ids, v)?;
    let n = ids.len();
    check_u32("output", n * c)?;
    let out = ctx.empty(&[n, c], DType::F32)?;
    if n * c == 0 {
        return Ok(out);
    }
    let ids_t = ctx.upload_u32(ids, &[n])?;
    for (i, part) in table.parts().iter().enumerate() {
        let r = table.range(i);
        check_u32("table shard", r.len() * c)?;
        let mut p = Params::new(n, c, r.len());
        p.row0 = r.start as u32;
        let groups = groups_2d(groups_for(n * c, WG as usize));
        if table.dtype() == DType::F32 {
            ctx.dispatch(&FORWARD, &p, &[part, &ids_t, &out], groups)?;
        } else {
            p = p.compact(table.dtype(), r.len() * c)?;
            ctx.dispatch(&FORWARD16, &p, &[&ids_t, &out, part], groups)?;
        }
    }
    Ok(out)
}

/// out (N, C) = table[ids] for a table kept in host memory ([`HostRows`]): the rows gathered
/// and widened on the host, then uploaded (N x C values, not the table); the same values as
/// [`forward_shards`] over the same table on the device.
pub fn forward_host(ctx: &GpuContext, table: &HostRows, ids: &[u32]) -> Result<Tensor> {
    check_ids(ids, table.rows())?;
    let c = table.cols();
    check_u32("output", ids.len() * c)?;
    let mut rows = Vec::with_capacity(ids.len() * c);
    for &id in ids {
        table.push_row(id as usize, &mut rows);
    }
    ctx.upload_f32(&rows, &[ids.len(), c])
}

/// Rows `rows` of shard `part` (its own row numbering, (R, C)) as a new f32 tensor (rows.len(),
/// C): widened from bf16 / f16, or copied from f32 (the shard itself when all rows are asked).
pub fn rows_f32(ctx: &GpuContext, part: &Tensor, rows: std::ops::Range<usize>) -> Result<Tensor> {
    let (r, c) = table_dims(part.shape())?;
    if rows.start > rows.end || rows.end > r {
        return Err(Error::shape("embedding", format!("rows {rows:?} of a ({r}, {c}) table")));
    }
    let n = rows.len();
    if part.dtype() == DType::F32 {
        if n == r {
            return Ok(part.clone());
        }
        let out = ctx.empty(&[n, c], DType::F32)?;
        ctx.copy_region(part, rows.start * c, &out, 0, n * c)?;
        return Ok(out);
    }
    check_u32("table", r * c)?;
    let out = ctx.empty(&[n, c], DType::F32)?;
    if n * c == 0 {
        return Ok(out);
    }
    let mut p = Params::new(n, c, r);
    p.row0 = rows.start as u32;
    p = p.compact(part.dtype(), r * c)?;
    ctx.dispatch(&WIDEN16, &p, &[&out, part], groups_2d(groups_for(n * c, WG as usize)))?;
    Ok(out)
}

/// Backward: dtable (V, C) with dtable[id] = sum of dout (N, C) rows at the positions of `id` in
/// `ids` (N), zero for ids that do not occur. Deterministic: each id's rows are summed in
/// position order by one workgroup.
pub fn backward(ctx: &GpuContext, dout: &Tensor, ids: &[u32], v: usize) -> Result<Tensor> {
    let n = ids.len();
    let c = *dout.shape().last().unwrap_or(&0);
    if dout.shape() != [n, c] {
        return Err(Error::shape("embedding", format!("dout {:?} for {n} ids", dout.shape())));
    }
    check_ids(ids, v)?;
    backward_grouped(ctx, dout, &group_ids(ids), v)
}

/// Backward from ids already grouped by `group_ids`: dtable (V, C) from dout (N, C).
pub fn backward_grouped(ctx: &GpuContext, dout: &Tensor, groups: &IdGroups, v: usize) -> Result<Tensor> {
    let n = groups.pos.len();
    let c = *dout.shape().last().unwrap_or(&0);
    if dout.shape() != [n, c] || groups.offsets.len() != groups.uniq.len() + 1 {
        return Err(Error::shape("embedding", format!("dout {:?} for {n} grouped ids", dout.shape())));
    }
    // `uniq` is ascending: its last id is the largest.
    if let Some(&id) = groups.uniq.last() {
        if id as usize >= v {
            return Err(Error::Invalid(format!("embedding: id {id} is outside the vocabulary [0, {v})")));
        }
    }
    check_u32("dtable", v * c)?;
    let dtable = ctx.zeros(&[v, c], DType::F32)?;
    let u = groups.uniq.len();
    if u == 0 || c == 0 {
        return Ok(dtable);
    }
    let uniq = ctx.upload_u32(&groups.uniq, &[u])?;
    let offsets = ctx.upload_u32(&groups.offsets, &[u + 1])?;
    let pos = ctx.upload_u32(&groups.pos, &[groups.pos.len()])?;
    let p = Params::new(u, c, v);
    ctx.dispatch(&BACKWARD, &p, &[&uniq, &offsets, &pos, dout, &dtable], groups_2d(u as u32))?;
    Ok(dtable)
}

pub(crate) struct Saved {
    groups: IdGroups,
    v: usize,
}

impl Saved {
    pub(crate) fn backward(self, ctx: &GpuContext, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let dtable = if needs[0] { Some(backward_grouped(ctx, g, &self.groups, self.v)?) } else { None };
        Ok(vec![dtable])
    }
}

/// Embedding on the tape: out (N, C) = table (V, C) [ids (N)]. The table is usually frozen, and
/// then nothing is recorded; when it is trainable the node keeps the ids grouped by id (host
/// memory only) and backward gives the dense dtable (V, C).
pub fn embedding(tape: &mut Tape, ctx: &GpuContext, table: &Var, ids: &[u32]) -> Result<Var> {
    let out = forward(ctx, table.value(), ids)?;
    let v = table.shape()[0];
    Ok(tape.record(out, &[table], || Op::Embedding(Saved { groups: group_ids(ids), v })))
}

/// f64 reference, row-major.
pub mod cpu {
    /// out (N, C) = table (V, C) [ids]; panics on an id outside the table (test helper).
    pub fn forward(table: &[f64], c: usize, ids: &[u32]) -> Vec<f64> {
        ids.iter().flat_map(|&id| table[id as usize * c..(id as usize + 1) * c].iter().copied()).collect()
    }

    /// dtable (V, C): dtable[ids[n]] += dout[n] for every n.
    pub fn backward(dout: &[f64], c: usize, ids: &[u32], v: usize) -> Vec<f64> {
        let mut d = vec![0.0; v * c];
        for (n, &id) in ids.iter().enumerate() {
            for j in 0..c {
                d[id as usize * c + j] += dout[n * c + j];
            }
        }
        d
    }
}
