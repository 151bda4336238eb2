//! Checkpoints: a folder that Hugging Face `transformers` loads as a GPT-2, plus what exact
//! resume needs.
//!
//! - `model.safetensors`: weights under GPT-2's tensor names (`transformer.h.0.attn.c_attn.weight`,
//!   Conv1D (in, out) layout, true vocabulary; the LM head is tied to `transformer.wte.weight`).
//! - `config.json`: a `GPT2LMHeadModel` config.
//! - `tokenizer.json`: the data's tokenizer.
//! - `optimizer.safetensors`: AdamW moments under the same names, prefixed `exp_avg.` and
//!   `exp_avg_sq.`.
//! - `trainer_state.json`: step, data position, seed, last val loss, the job.
//!
//! A checkpoint is written into a temporary folder, every file fsynced, then renamed into
//! place: a reader sees a whole checkpoint or none.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use ferrite_kernels::Backend;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::layout::{ParamLayout, Tensor};
use crate::{Gpt, GptConfig, JobSpec, ModelError};

pub const MODEL_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Where the data sampler continues; batches are a function of the step, so this is the
    /// step at which sampling resumes.
    pub data_position: u64,
    /// The seed of every random stream (sampling is counter-based: no other RNG state).
    pub seed: u64,
    pub val_loss: Option<f32>,
    pub job: JobSpec,
}

/// Hugging Face GPT-2 name of one instance of a tensor.
pub fn hf_name(t: Tensor, layer: usize) -> String {
    let h = |s: &str| format!("transformer.h.{layer}.{s}");
    match t {
        Tensor::Wte => "transformer.wte.weight".into(),
        Tensor::Wpe => "transformer.wpe.weight".into(),
        Tensor::Ln1W => h("ln_1.weight"),
        Tensor::Ln1B => h("ln_1.bias"),
        Tensor::QkvW => h("attn.c_attn.weight"),
        Tensor::QkvB => h("attn.c_attn.bias"),
        Tensor::AttProjW => h("attn.c_proj.weight"),
        Tensor::AttProjB => h("attn.c_proj.bias"),
        Tensor::Ln2W => h("ln_2.weight"),
        Tensor::Ln2B => h("ln_2.bias"),
        Tensor::FcW => h("mlp.c_fc.weight"),
        Tensor::FcB => h("mlp.c_fc.bias"),
        Tensor::FcProjW => h("mlp.c_proj.weight"),
        Tensor::FcProjB => h("mlp.c_proj.bias"),
        Tensor::LnfW => "transformer.ln_f.weight".into(),
        Tensor::LnfB => "transformer.ln_f.bias".into(),
    }
}

/// Every (name, range in the buffer, HF shape) of a model, the vocabulary unpadded.
fn named_ranges(
    cfg: &GptConfig,
    lay: &ParamLayout,
) -> Vec<(String, std::ops::Range<usize>, Vec<usize>)> {
    let mut out = Vec::new();
    for t in Tensor::ALL {
        let layers = if t.per_layer() { cfg.n_layer } else { 1 };
        for l in 0..layers {
            let mut r = lay.at(t, l);
            let mut shape = t.shape(cfg);
            if t == Tensor::Wte {
                shape[0] = cfg.vocab_size;
                r.end = r.start + cfg.vocab_size * cfg.n_embd;
            }
            out.push((hf_name(t, l), r, shape));
        }
    }
    out
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.display().to_string(), source }
}

fn bad(path: &Path, why: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint(format!("{}: {why}", path.display()))
}

fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<(), ModelError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), d.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, d)| {
            Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), d).map_err(|e| bad(path, e))?))
        })
        .collect::<Result<_, ModelError>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let data = safetensors::serialize(views, Some(meta)).map_err(|e| bad(path, e))?;
    write_synced(path, &data)
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), ModelError> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// The `config.json` that `transformers` reads for this model.
pub fn hf_config(cfg: &GptConfig, eot: Option<u32>) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": true,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    })
}

/// Folder name of the checkpoint of `step`.
pub fn folder_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint of `gpt` under `root` and returns its folder.
pub fn save<B: Backend>(
    be: &B,
    gpt: &Gpt<B>,
    state: &TrainerState,
    tokenizer_json: &Path,
    root: &Path,
) -> Result<PathBuf, ModelError> {
    let cfg = &gpt.cfg;
    let n = gpt.layout.len();
    let host = |buf: &B::Buf| -> Result<Vec<f32>, ModelError> {
        let mut v = vec![0.0; n];
        be.download(be.view(buf, 0..n), &mut v)?;
        Ok(v)
    };
    let (params, m, v) = (host(&gpt.params)?, host(&gpt.m)?, host(&gpt.v)?);
    fs::create_dir_all(root).map_err(io_err(root))?;
    let name = folder_name(state.step);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;

    let ranges = named_ranges(cfg, &gpt.layout);
    let weights: Vec<_> =
        ranges.iter().map(|(nm, r, s)| (nm.clone(), s.clone(), &params[r.clone()])).collect();
    write_tensors(&tmp.join(MODEL_FILE), &weights)?;
    let mut moments = Vec::new();
    for (nm, r, s) in &ranges {
        moments.push((format!("exp_avg.{nm}"), s.clone(), &m[r.clone()]));
        moments.push((format!("exp_avg_sq.{nm}"), s.clone(), &v[r.clone()]));
    }
    write_tensors(&tmp.join(OPTIMIZER_FILE), &moments)?;
    let tok = fs::read(tokenizer_json).map_err(io_err(tokenizer_json))?;
    let eot = ferrite_data::Tokenizer::load(tokenizer_json).ok().and_then(|t| t.eot());
    write_synced(&tmp.join(TOKENIZER_FILE), &tok)?;
    let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("json");
    write_synced(&tmp.join(CONFIG_FILE), &json(&hf_config(cfg, eot)))?;
    let st = serde_json::to_value(state).map_err(|e| bad(&tmp, e))?;
    write_synced(&tmp.join(STATE_FILE), &json(&st))?;
    File::open(&tmp).and_then(|d| d.sync_all()).map_err(io_err(&tmp))?;

    let dest = root.join(&name);
    if dest.exists() {
        // A resumed run saving the same step again: the new one replaces it.
        let old = root.join(format!(".{name}.old-{}", std::process::id()));
        fs::rename(&dest, &old).map_err(io_err(&dest))?;
        fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    }
    File::open(root).and_then(|d| d.sync_all()).map_err(io_err(root))?;
    Ok(dest)
}

/// Whole checkpoints under `root`, oldest first (temporary folders are not listed).
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>, ModelError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(root)(e)),
    };
    for e in entries {
        let e = e.map_err(io_err(root))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
            out.push((step, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Keeps the newest `keep` checkpoints under `root` (0 keeps all).
pub fn prune(root: &Path, keep: usize) -> Result<(), ModelError> {
    let all = list(root)?;
    if keep == 0 || all.len() <= keep {
        return Ok(());
    }
    for (_, p) in &all[..all.len() - keep] {
        fs::remove_dir_all(p).map_err(io_err(p))?;
    }
    Ok(())
}

/// Weights of a checkpoint, ours or one saved by `transformers`.
pub struct LoadedWeights {
    pub config: GptConfig,
    /// In this crate's parameter layout (vocabulary padded with zeros).
    pub params: Vec<f32>,
}

/// Reads `config.json`, accepting what `transformers` writes for GPT-2.
pub fn load_config(dir: &Path) -> Result<GptConfig, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&path, e))?;
    let get = |k: &str| -> Result<usize, ModelError> {
        v.get(k)
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .ok_or_else(|| bad(&path, format!("missing or non-integer field {k:?}")))
    };
    if let Some(act) = v.get("activation_function").and_then(|a| a.as_str()) {
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            return Err(bad(
                &path,
                format!("activation_function {act:?} is not GPT-2's tanh GELU"),
            ));
        }
    }
    if let Some(inner) = v.get("n_inner").filter(|x| !x.is_null()) {
        if inner.as_u64() != Some(4 * get("n_embd")? as u64) {
            return Err(bad(&path, format!("n_inner {inner} is not 4 * n_embd")));
        }
    }
    let cfg = GptConfig {
        n_layer: get("n_layer")?,
        n_head: get("n_head")?,
        n_embd: get("n_embd")?,
        block_size: get("n_positions")?,
        vocab_size: get("vocab_size")?,
    };
    cfg.validate().map_err(|e| bad(&path, e))?;
    Ok(cfg)
}

fn read_f32(
    path: &Path,
    name: &str,
    view: &TensorView,
    want: &[usize],
    out: &mut [f32],
) -> Result<(), ModelError> {
    if view.shape() != want {
        return Err(bad(
            path,
            format!("tensor {name} has shape {:?}, expected {want:?}", view.shape()),
        ));
    }
    let d = view.data();
    match view.dtype() {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(d.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(d.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(d.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        other => {
            return Err(bad(
                path,
                format!("tensor {name} has dtype {other:?}; F32, BF16, F16 load"),
            ))
        }
    }
    if let Some(i) = out.iter().position(|x| !x.is_finite()) {
        return Err(bad(path, format!("tensor {name} holds a non-finite value at {i}")));
    }
    Ok(())
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // subnormal: renormalise
            let mut e = -1i32;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | (((e + 127 - 14) as u32) << 23) | ((f & 0x3ff) << 13)
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | (((e - 15 + 127) as u32) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// Buffers past the weights that GPT-2 files may carry and loading skips.
fn is_known_extra(name: &str) -> bool {
    name == "lm_head.weight" || name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
}

fn load_named(
    path: &Path,
    cfg: &GptConfig,
    lay: &ParamLayout,
    prefix: &str,
) -> Result<Vec<f32>, ModelError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, e))?;
    let mut out = vec![0.0f32; lay.len()];
    let ranges = named_ranges(cfg, lay);
    let by_name: HashMap<String, String> = st
        .names()
        .into_iter()
        .map(|n| {
            let plain = n.strip_prefix(prefix).unwrap_or(n);
            // GPT2Model files name tensors without the `transformer.` prefix.
            let full = if plain.starts_with("transformer.") || plain.starts_with("lm_head") {
                plain.to_string()
            } else {
                format!("transformer.{plain}")
            };
            (full, n.to_string())
        })
        .collect();
    for (name, r, shape) in &ranges {
        let stored =
            by_name.get(name).ok_or_else(|| bad(path, format!("missing tensor {prefix}{name}")))?;
        let view = st.tensor(stored).map_err(|e| bad(path, format!("tensor {stored}: {e}")))?;
        read_f32(path, stored, &view, shape, &mut out[r.clone()])?;
    }
    let expected: std::collections::HashSet<&str> =
        ranges.iter().map(|(n, _, _)| n.as_str()).collect();
    for (full, stored) in &by_name {
        if !expected.contains(full.as_str()) && !is_known_extra(full) {
            return Err(bad(
                path,
                format!("unexpected tensor {stored} for a {}-layer model", cfg.n_layer),
            ));
        }
    }
    Ok(out)
}

/// Loads the weights of a checkpoint folder (ours, or `transformers`' `save_pretrained`).
pub fn load_weights(dir: &Path) -> Result<LoadedWeights, ModelError> {
    let config = load_config(dir)?;
    let lay = ParamLayout::new(&config);
    let params = load_named(&dir.join(MODEL_FILE), &config, &lay, "")?;
    Ok(LoadedWeights { config, params })
}

/// Loads the AdamW moments (m, v) of one of our checkpoints.
pub fn load_optimizer(dir: &Path, lay: &ParamLayout) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
    let cfg = load_config(dir)?;
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = fs::read(&path).map_err(io_err(&path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(&path, e))?;
    let (mut m, mut v) = (vec![0.0f32; lay.len()], vec![0.0f32; lay.len()]);
    for (name, r, shape) in named_ranges(&cfg, lay) {
        for (prefix, out) in [("exp_avg.", &mut m), ("exp_avg_sq.", &mut v)] {
            let full = format!("{prefix}{name}");
            let view =
                st.tensor(&full).map_err(|_| bad(&path, format!("missing tensor {full}")))?;
            read_f32(&path, &full, &view, &shape, &mut out[r.clone()])?;
        }
    }
    Ok((m, v))
}

pub fn load_state(dir: &Path) -> Result<TrainerState, ModelError> {
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| bad(&path, e))
}
