//! Checkpoint folders: round trips, Hugging Face naming, and refusal of damaged files.

use std::path::Path;

use ferrite_kernels::CpuBackend;
use ferrite_model::checkpoint::{self, TrainerState};
use ferrite_model::{Gpt, GptConfig, JobSpec};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

fn cfg() -> GptConfig {
    GptConfig { n_layer: 2, n_head: 2, n_embd: 8, block_size: 6, vocab_size: 13 }
}

fn state(step: u64) -> TrainerState {
    let job = JobSpec::parse(
        "[model]\nn_layer = 2\nn_head = 2\nn_embd = 8\nblock_size = 6\n[data]\ndir = \"d\"\n\
         [output]\ndir = \"o\"\n",
    )
    .unwrap();
    TrainerState { step, data_position: step, seed: 1, val_loss: Some(2.5), job }
}

fn saved(root: &Path) -> (Gpt<CpuBackend>, std::path::PathBuf) {
    let be = CpuBackend::new(1).unwrap();
    let mut gpt = Gpt::new(&be, cfg(), 1, 6).unwrap();
    gpt.init_gpt2(&be, 9).unwrap();
    // Moments past the embedding (the vocabulary padding rows never get a gradient).
    let from = gpt.layout.all(ferrite_model::layout::Tensor::Wte).end;
    for (i, x) in gpt.m.iter_mut().enumerate().skip(from) {
        *x = i as f32 * 1e-3;
    }
    let tok = root.join("tokenizer.json");
    std::fs::write(&tok, "{\"test\": true}").unwrap();
    let dir = checkpoint::save(&be, &gpt, &state(7), &tok, &root.join("ck")).unwrap();
    (gpt, dir)
}

#[test]
fn save_then_load_round_trips_weights_moments_and_state() {
    let tmp = tempfile::tempdir().unwrap();
    let (gpt, dir) = saved(tmp.path());
    assert!(dir.ends_with("step-00000007"));
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let w = checkpoint::load_weights(&dir).unwrap();
    assert_eq!(w.config, cfg());
    assert!(w.params == gpt.params, "weights differ after a round trip");
    let (m, v) = checkpoint::load_optimizer(&dir, &gpt.layout).unwrap();
    assert!(m == gpt.m && v == gpt.v, "moments differ after a round trip");
    assert_eq!(checkpoint::load_state(&dir).unwrap(), state(7));
    // No temporary folder is left behind and the listing sees exactly one checkpoint.
    let names: Vec<_> =
        std::fs::read_dir(tmp.path().join("ck")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn uses_hugging_face_gpt2_names_and_conv1d_shapes_with_the_true_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved(tmp.path());
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("transformer.wte.weight").unwrap().shape(), &[13, 8]);
    assert_eq!(st.tensor("transformer.wpe.weight").unwrap().shape(), &[6, 8]);
    assert_eq!(st.tensor("transformer.h.1.attn.c_attn.weight").unwrap().shape(), &[8, 24]);
    assert_eq!(st.tensor("transformer.h.0.mlp.c_proj.weight").unwrap().shape(), &[32, 8]);
    assert_eq!(st.tensor("transformer.ln_f.bias").unwrap().shape(), &[8]);
    assert_eq!(st.names().len(), 2 + 12 * 2 + 2);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(config["n_positions"], 6);
    assert_eq!(config["activation_function"], "gelu_new");
}

#[test]
fn loads_transformers_style_files_without_prefix_and_with_buffers() {
    // GPT2Model saves names without `transformer.`; older files add attn.bias masks and an
    // explicit lm_head.weight.
    let tmp = tempfile::tempdir().unwrap();
    let (gpt, dir) = saved(tmp.path());
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n.strip_prefix("transformer.").unwrap().to_string(),
                v.shape().to_vec(),
                v.data().to_vec(),
            )
        })
        .collect();
    tensors.push(("h.0.attn.bias".into(), vec![1, 1, 6, 6], vec![0u8; 36 * 4]));
    let wte = tensors.iter().find(|t| t.0 == "wte.weight").unwrap().clone();
    tensors.push(("lm_head.weight".into(), wte.1, wte.2));
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), d).unwrap()))
        .collect();
    let hf = tmp.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    std::fs::copy(dir.join("config.json"), hf.join("config.json")).unwrap();
    safetensors::serialize_to_file(views, None, &hf.join("model.safetensors")).unwrap();
    assert!(checkpoint::load_weights(&hf).unwrap().params == gpt.params);
}

#[test]
fn truncated_model_file_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved(tmp.path());
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
    let err = checkpoint::load_weights(&dir).err().expect("refused").to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn tensor_shape_disagreeing_with_config_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved(tmp.path());
    let cfg_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    config["vocab_size"] = 14.into();
    std::fs::write(&cfg_path, config.to_string()).unwrap();
    let err = checkpoint::load_weights(&dir).err().expect("refused").to_string();
    assert!(err.contains("transformer.wte.weight"), "{err}");
}

#[test]
fn missing_tensor_and_bad_config_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved(tmp.path());
    let cfg_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    config["n_layer"] = 3.into();
    std::fs::write(&cfg_path, config.to_string()).unwrap();
    let err = checkpoint::load_weights(&dir).err().expect("refused").to_string();
    assert!(err.contains("transformer.h.2."), "{err}");
    std::fs::write(&cfg_path, "{\"n_layer\": 2").unwrap();
    let err = checkpoint::load_weights(&dir).err().expect("refused").to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn prune_keeps_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ck");
    for s in [5, 10, 15, 20] {
        std::fs::create_dir_all(root.join(checkpoint::folder_name(s))).unwrap();
    }
    std::fs::create_dir_all(root.join(".step-00000025.tmp-1")).unwrap();
    checkpoint::prune(&root, 2).unwrap();
    let left: Vec<u64> = checkpoint::list(&root).unwrap().iter().map(|(s, _)| *s).collect();
    assert_eq!(left, vec![15, 20]);
}
