//! Where each parameter tensor lives in the one contiguous parameter buffer (the gradient
//! buffer and both AdamW moments share the layout). Per-layer tensors are stacked, layer
//! major, so each kind of tensor is one contiguous range for all layers.

use std::ops::Range;

use crate::GptConfig;

/// The parameter tensors, in buffer order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tensor {
    Wte,
    Wpe,
    Ln1W,
    Ln1B,
    QkvW,
    QkvB,
    AttProjW,
    AttProjB,
    Ln2W,
    Ln2B,
    FcW,
    FcB,
    FcProjW,
    FcProjB,
    LnfW,
    LnfB,
}

impl Tensor {
    pub const ALL: [Tensor; 16] = [
        Tensor::Wte,
        Tensor::Wpe,
        Tensor::Ln1W,
        Tensor::Ln1B,
        Tensor::QkvW,
        Tensor::QkvB,
        Tensor::AttProjW,
        Tensor::AttProjB,
        Tensor::Ln2W,
        Tensor::Ln2B,
        Tensor::FcW,
        Tensor::FcB,
        Tensor::FcProjW,
        Tensor::FcProjB,
        Tensor::LnfW,
        Tensor::LnfB,
    ];

    /// The tensors each layer has its own of, in layout order: [`Tensor::ALL`] without the
    /// embeddings before them and the final LayerNorm after.
    pub const PER_LAYER: &'static [Tensor] = Tensor::ALL.split_at(2).1.split_at(12).0;

    /// Whether the tensor is one per layer.
    pub fn per_layer(self) -> bool {
        !matches!(self, Tensor::Wte | Tensor::Wpe | Tensor::LnfW | Tensor::LnfB)
    }

    /// Matrices get weight decay; biases, LayerNorm parameters do not.
    pub fn decays(self) -> bool {
        matches!(
            self,
            Tensor::Wte
                | Tensor::Wpe
                | Tensor::QkvW
                | Tensor::AttProjW
                | Tensor::FcW
                | Tensor::FcProjW
        )
    }

    /// Shape of one instance (one layer's for per-layer tensors), in buffer layout:
    /// linear weights are (in, out), GPT-2's Conv1D layout; wte has the padded vocabulary.
    pub fn shape(self, cfg: &GptConfig) -> Vec<usize> {
        let c = cfg.n_embd;
        match self {
            Tensor::Wte => vec![cfg.padded_vocab(), c],
            Tensor::Wpe => vec![cfg.block_size, c],
            Tensor::Ln1W | Tensor::Ln1B | Tensor::Ln2W | Tensor::Ln2B => vec![c],
            Tensor::LnfW | Tensor::LnfB | Tensor::AttProjB | Tensor::FcProjB => vec![c],
            Tensor::QkvW => vec![c, 3 * c],
            Tensor::QkvB => vec![3 * c],
            Tensor::AttProjW => vec![c, c],
            Tensor::FcW => vec![c, 4 * c],
            Tensor::FcB => vec![4 * c],
            Tensor::FcProjW => vec![4 * c, c],
        }
    }
}

/// Offsets of every tensor in the parameter buffer.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    starts: [usize; 16],
    sizes: [usize; 16],
    n_layer: usize,
    total: usize,
}

impl ParamLayout {
    pub fn new(cfg: &GptConfig) -> Self {
        let mut starts = [0; 16];
        let mut sizes = [0; 16];
        let mut at = 0;
        for (i, t) in Tensor::ALL.iter().enumerate() {
            let one: usize = t.shape(cfg).iter().product();
            starts[i] = at;
            sizes[i] = one;
            at += one * if t.per_layer() { cfg.n_layer } else { 1 };
        }
        ParamLayout { starts, sizes, n_layer: cfg.n_layer, total: at }
    }

    /// Total number of floats, padding included.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The whole range of a tensor (all layers for per-layer tensors).
    pub fn all(&self, t: Tensor) -> Range<usize> {
        let i = t as usize;
        let n = if t.per_layer() { self.n_layer } else { 1 };
        self.starts[i]..self.starts[i] + n * self.sizes[i]
    }

    /// One layer's instance of a per-layer tensor (layer ignored for the others).
    pub fn at(&self, t: Tensor, layer: usize) -> Range<usize> {
        let i = t as usize;
        let l = if t.per_layer() { layer } else { 0 };
        let s = self.starts[i] + l * self.sizes[i];
        s..s + self.sizes[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_layer_is_every_per_layer_tensor_in_order() {
        let filtered: Vec<Tensor> = Tensor::ALL.into_iter().filter(|t| t.per_layer()).collect();
        assert_eq!(Tensor::PER_LAYER, filtered.as_slice());
    }

    #[test]
    fn tensors_tile_the_buffer_without_gaps() {
        let cfg = GptConfig { n_layer: 3, n_head: 2, n_embd: 8, block_size: 5, vocab_size: 70 };
        let lay = ParamLayout::new(&cfg);
        let mut at = 0;
        for t in Tensor::ALL {
            assert_eq!(lay.all(t).start, at, "{t:?}");
            at = lay.all(t).end;
        }
        assert_eq!(at, lay.len());
        // Everything but the vocabulary padding is a parameter.
        assert_eq!(lay.len() - (cfg.padded_vocab() - cfg.vocab_size) * 8, cfg.num_params());
        assert_eq!(lay.at(Tensor::QkvW, 2).end, lay.all(Tensor::QkvW).end);
    }
}
