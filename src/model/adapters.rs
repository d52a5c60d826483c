//! LoRA adapters on a backend ([`Lora`]) and the block's linear products with them
//! ([`linear_forward`], [`linear_backward`]).
//!
//! Every adapter product goes through the backend's `matmul` ops, so every backend (and the
//! emulated device) runs them: forward `h = s · (x Aᵀ)`, `out += h Bᵀ`; backward `h` recomputed
//! (one small product, so nothing is kept per layer and activation checkpointing needs nothing
//! more), `dB += doutᵀ h`, `dh = s · dout B`, `dA += dhᵀ x`, `dx += dh A`. An adapter on a part of a
//! fused product (`q_proj` of `qkv_proj`) reads and writes that part's columns through
//! `gather_rows` / `scatter_rows` over the product viewed as rows of whole heads (or MLP widths).
//!
//! With LoRA the base weights are frozen: a model with adapters holds no base gradient, and a
//! base product's backward computes the input's gradient only (`dinp = dout Wᵀ`, a forward product
//! on the transposed layout). The norms' weight gradients, which their kernels accumulate as they go,
//! land in one scratch norm that nothing reads.

use std::collections::HashMap;

use anyhow::Result;

use super::lora::{peft_names, Columns, HostAdapters, LoraSpec, Slot};
use super::params::{Linear, Norm};
use super::DecoderConfig;
use crate::backend::{Backend, WeightLayout};

/// One adapter's `A [r, in]` and `B [out, r]`, and where it writes.
pub(super) struct Adapter<T> {
    pub(super) a: T,
    pub(super) b: T,
    pub(super) fan_in: usize,
    pub(super) fan_out: usize,
    pub(super) columns: Option<Columns>,
}

/// One block's adapters, by the product they join (several on a fused product).
pub(super) struct BlockAdapters<T> {
    pub(super) by_slot: [Vec<Adapter<T>>; 4],
}

impl<T> BlockAdapters<T> {
    pub(super) fn slot(&self, slot: Slot) -> &[Adapter<T>] {
        &self.by_slot[slot as usize]
    }
    fn tensors(&self) -> impl Iterator<Item = &T> {
        self.by_slot.iter().flatten().flat_map(|a| [&a.a, &a.b])
    }
    fn tensors_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.by_slot.iter_mut().flatten().flat_map(|a| [&mut a.a, &mut a.b])
    }
}

/// Buffers the adapter products reuse, and the row ids of each fused part at the current batch size.
pub(super) struct LoraScratch<B: Backend> {
    h: B::Buf,
    dh: B::Buf,
    part: B::Buf,
    full: B::Buf,
    dx: B::Buf,
    /// (tokens, offset, total, unit) → the unit-rows of that part.
    ids: HashMap<(usize, usize, usize, usize), B::Ids>,
}

/// A model's adapters: the spec, every block's adapters (and their gradients when trainable), the
/// scratch, and whether they are on (off: the base model, bit for bit).
pub(super) struct Lora<B: Backend> {
    pub(super) host: HostAdapters,
    pub(super) scale: f32,
    pub(super) blocks: Vec<BlockAdapters<B::Buf>>,
    pub(super) grads: Option<Vec<BlockAdapters<B::Buf>>>,
    pub(super) scratch: LoraScratch<B>,
    /// Where the frozen norms' weight gradients go (see the module documentation).
    pub(super) norm_sink: Norm<B::Buf>,
    pub(super) enabled: bool,
    /// PEFT names of `blocks`' tensors in their order (per block: per target, A then B).
    pub(super) names: Vec<String>,
}

impl<B: Backend> Lora<B> {
    /// Uploads `host` (trainable: with zeroed gradients).
    pub(super) fn upload(b: &B, config: &DecoderConfig, host: HostAdapters, trainable: bool) -> Result<Self> {
        let mut names = Vec::new();
        let mut blocks = Vec::new();
        let mut grads = Vec::new();
        for layer in 0..config.n_layer {
            let mut block = BlockAdapters { by_slot: Default::default() };
            let mut grad = BlockAdapters { by_slot: Default::default() };
            for t in &host.targets {
                let [a, bn] = peft_names(config, t, layer);
                let adapter =
                    |a, b_: B::Buf| Adapter { a, b: b_, fan_in: t.fan_in, fan_out: t.fan_out, columns: t.columns };
                block.by_slot[t.slot as usize]
                    .push(adapter(b.upload(&host.tensors[&a].1)?, b.upload(&host.tensors[&bn].1)?));
                if trainable {
                    let (la, lb) = (host.spec.r * t.fan_in, t.fan_out * host.spec.r);
                    grad.by_slot[t.slot as usize].push(adapter(b.zeros(la)?, b.zeros(lb)?));
                }
                names.extend([a, bn]);
            }
            blocks.push(block);
            grads.push(grad);
        }
        // `resolve_targets` lists a block's targets slot by slot, so `names` is the order of
        // `BlockAdapters::tensors` too.
        let c = config.n_embd;
        let norm_sink = Norm { w: b.zeros(c)?, b: if config.family.is_gpt2() { Some(b.zeros(c)?) } else { None } };
        let scratch = LoraScratch {
            h: b.zeros(0)?,
            dh: b.zeros(0)?,
            part: b.zeros(0)?,
            full: b.zeros(0)?,
            dx: b.zeros(0)?,
            ids: HashMap::new(),
        };
        Ok(Self {
            scale: host.spec.scale(),
            host,
            blocks,
            grads: trainable.then_some(grads),
            scratch,
            norm_sink,
            enabled: true,
            names,
        })
    }

    /// Every adapter tensor, in `names` order.
    pub(super) fn tensors(&self) -> Vec<&B::Buf> {
        self.blocks.iter().flat_map(BlockAdapters::tensors).collect()
    }

    /// Every gradient, in `names` order (`None` when not trainable).
    pub(super) fn grad_tensors(&self) -> Option<Vec<&B::Buf>> {
        self.grads.as_ref().map(|g| g.iter().flat_map(BlockAdapters::tensors).collect())
    }

    pub(super) fn grad_tensors_mut(&mut self) -> Option<Vec<&mut B::Buf>> {
        self.grads.as_mut().map(|g| g.iter_mut().flat_map(BlockAdapters::tensors_mut).collect())
    }

    /// The adapters as they are now, on the host.
    pub(super) fn to_host(&self, b: &B) -> Result<HostAdapters> {
        let mut host = self.host.clone();
        for (name, buf) in self.names.iter().zip(self.tensors()) {
            let entry = host.tensors.get_mut(name).expect("uploaded from these names");
            let mut data = b.download(buf)?;
            data.truncate(entry.1.len());
            entry.1 = data;
        }
        Ok(host)
    }

    /// Block `l`'s adapters for one pass: `None` when they are off.
    pub(super) fn block(&mut self, l: usize) -> Option<BlockLora<'_, B>> {
        if !self.enabled {
            return None;
        }
        Some(BlockLora {
            adapters: &self.blocks[l],
            grads: self.grads.as_mut().map(|g| &mut g[l]),
            scratch: &mut self.scratch,
            scale: self.scale,
        })
    }

    /// [`block`](Self::block) with the scratch norm that takes the frozen norms' gradients; the
    /// scratch norm is `None` when the model is not trainable.
    pub(super) fn block_with_sink(&mut self, l: usize) -> (Option<BlockLora<'_, B>>, Option<&mut Norm<B::Buf>>) {
        let Self { blocks, grads, scratch, norm_sink, enabled, scale, .. } = self;
        let trainable = grads.is_some();
        let adapters = enabled.then(|| BlockLora {
            adapters: &blocks[l],
            grads: grads.as_mut().map(|g| &mut g[l]),
            scratch,
            scale: *scale,
        });
        (adapters, trainable.then_some(norm_sink))
    }

    pub(super) fn spec(&self) -> &LoraSpec {
        &self.host.spec
    }

    /// Every buffer held (for memory accounting).
    pub(super) fn buffers(&self) -> Vec<&B::Buf> {
        let mut bufs = self.tensors();
        bufs.extend(self.grad_tensors().unwrap_or_default());
        let s = &self.scratch;
        bufs.extend([&s.h, &s.dh, &s.part, &s.full, &s.dx]);
        bufs
    }
}

/// One block's adapters in a pass, with the scratch they share.
pub(super) struct BlockLora<'a, B: Backend> {
    adapters: &'a BlockAdapters<B::Buf>,
    grads: Option<&'a mut BlockAdapters<B::Buf>>,
    scratch: &'a mut LoraScratch<B>,
    scale: f32,
}

impl<B: Backend> BlockLora<'_, B> {
    /// Whether `slot` has an adapter.
    pub(super) fn adapts(&self, slot: Slot) -> bool {
        !self.adapters.slot(slot).is_empty()
    }
}

/// The unit-rows of `cols` in a `[n, total]` product (ids cached per batch size).
fn part_ids<'s, B: Backend>(
    b: &B,
    cache: &'s mut HashMap<(usize, usize, usize, usize), B::Ids>,
    n: usize,
    cols: Columns,
    width: usize,
) -> Result<&'s B::Ids> {
    let key = (n, cols.offset, cols.total, cols.unit);
    if !cache.contains_key(&key) {
        cache.retain(|k, _| k.0 == n);
        let per_row = cols.total / cols.unit;
        let (first, count) = (cols.offset / cols.unit, width / cols.unit);
        let ids: Vec<i32> =
            (0..n).flat_map(|t| (first..first + count).map(move |j| (t * per_row + j) as i32)).collect();
        cache.insert(key, b.upload_ids(&ids)?);
    }
    Ok(&cache[&key])
}

/// `out [n, total] += scale · (inp Aᵀ) Bᵀ` for every adapter of `slot` (on its columns).
fn adapters_forward<B: Backend>(
    b: &B,
    lora: &mut BlockLora<'_, B>,
    slot: Slot,
    out: &mut B::Buf,
    inp: &B::Buf,
    n: usize,
) -> Result<()> {
    let s = &mut *lora.scratch;
    for ad in lora.adapters.slot(slot) {
        let r = b.buf_len(&ad.a) / ad.fan_in;
        b.resize(&mut s.h, n * r)?;
        b.matmul_forward(&mut s.h, inp, &ad.a, None, n, ad.fan_in, r, WeightLayout::OutIn)?;
        b.scale(&mut s.h, lora.scale)?;
        b.resize(&mut s.part, n * ad.fan_out)?;
        b.matmul_forward(&mut s.part, &s.h, &ad.b, None, n, r, ad.fan_out, WeightLayout::OutIn)?;
        match ad.columns {
            None => b.add_inplace(out, &s.part)?,
            Some(cols) => {
                b.resize(&mut s.full, n * cols.total)?;
                let (m, rows) = (n * ad.fan_out / cols.unit, n * cols.total / cols.unit);
                let ids = part_ids(b, &mut s.ids, n, cols, ad.fan_out)?;
                b.scatter_rows(&mut s.full, &s.part, ids, m, rows, cols.unit)?;
                b.add_inplace(out, &s.full)?;
            }
        }
    }
    Ok(())
}

/// The adapters' backward for `slot`: their gradients accumulate, and `dinp` gains their share.
fn adapters_backward<B: Backend>(
    b: &B,
    lora: &mut BlockLora<'_, B>,
    slot: Slot,
    dinp: &mut B::Buf,
    dout: &B::Buf,
    inp: &B::Buf,
    n: usize,
) -> Result<()> {
    let s = &mut *lora.scratch;
    let grads = lora.grads.as_deref_mut().expect("a backward runs on a trainable model");
    for (ad, g) in lora.adapters.slot(slot).iter().zip(&mut grads.by_slot[slot as usize]) {
        let r = b.buf_len(&ad.a) / ad.fan_in;
        b.resize(&mut s.h, n * r)?;
        b.matmul_forward(&mut s.h, inp, &ad.a, None, n, ad.fan_in, r, WeightLayout::OutIn)?;
        b.scale(&mut s.h, lora.scale)?;
        let dpart = match ad.columns {
            None => dout,
            Some(cols) => {
                b.resize(&mut s.part, n * ad.fan_out)?;
                let (m, rows) = (n * ad.fan_out / cols.unit, n * cols.total / cols.unit);
                let ids = part_ids(b, &mut s.ids, n, cols, ad.fan_out)?;
                b.gather_rows(&mut s.part, dout, ids, m, rows, cols.unit)?;
                &s.part
            }
        };
        b.resize(&mut s.dh, n * r)?;
        b.matmul_backward(&mut s.dh, &mut g.b, None, dpart, &s.h, &ad.b, n, r, ad.fan_out, WeightLayout::OutIn)?;
        b.scale(&mut s.dh, lora.scale)?;
        b.resize(&mut s.dx, n * ad.fan_in)?;
        b.matmul_backward(&mut s.dx, &mut g.a, None, &s.dh, inp, &ad.a, n, ad.fan_in, r, WeightLayout::OutIn)?;
        b.add_inplace(dinp, &s.dx)?;
    }
    Ok(())
}

/// `out = inp · W (+ bias)`, plus the block's adapters on `slot` when it has any.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_forward<B: Backend>(
    b: &B,
    out: &mut B::Buf,
    inp: &B::Buf,
    w: &Linear<B::Buf>,
    lora: Option<&mut BlockLora<'_, B>>,
    slot: Slot,
    n: usize,
    ic: usize,
    oc: usize,
    layout: WeightLayout,
) -> Result<()> {
    b.matmul_forward(out, inp, &w.w, w.b.as_ref(), n, ic, oc, layout)?;
    match lora {
        Some(lora) => adapters_forward(b, lora, slot, out, inp, n),
        None => Ok(()),
    }
}

/// The backward of [`linear_forward`]: overwrites `dinp`; accumulates the weight's gradients into
/// `g` (none with LoRA: the base is frozen, only `dinp` is computed) and the adapters'.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_backward<B: Backend>(
    b: &B,
    dinp: &mut B::Buf,
    g: Option<&mut Linear<B::Buf>>,
    dout: &B::Buf,
    inp: &B::Buf,
    w: &Linear<B::Buf>,
    lora: Option<&mut BlockLora<'_, B>>,
    slot: Slot,
    n: usize,
    ic: usize,
    oc: usize,
    layout: WeightLayout,
) -> Result<()> {
    match g {
        Some(g) => b.matmul_backward(dinp, &mut g.w, g.b.as_mut(), dout, inp, &w.w, n, ic, oc, layout)?,
        None => input_gradient(b, dinp, dout, &w.w, n, ic, oc, layout)?,
    }
    match lora {
        Some(lora) => adapters_backward(b, lora, slot, dinp, dout, inp, n),
        None => Ok(()),
    }
}

/// `dinp [n, ic] = dout [n, oc] · Wᵀ` alone: a forward product with the weight read the other way
/// (`[ic, oc]` is `OutIn` of an `oc → ic` product, `[oc, ic]` its `InOut`).
#[allow(clippy::too_many_arguments)]
pub(super) fn input_gradient<B: Backend>(
    b: &B,
    dinp: &mut B::Buf,
    dout: &B::Buf,
    weight: &B::Buf,
    n: usize,
    ic: usize,
    oc: usize,
    layout: WeightLayout,
) -> Result<()> {
    let transposed = match layout {
        WeightLayout::InOut => WeightLayout::OutIn,
        WeightLayout::OutIn => WeightLayout::InOut,
    };
    b.matmul_forward(dinp, dout, weight, None, n, oc, ic, transposed)
}
