"""condlora.synthesis: zero-shot LoRA synthesis (a VAE and a diffusion prior over LoRA vectors).

zoo         `synth zoo`: one LoRA per subject folder, many at a time (bank: per-sample LoRAs)
collection  `collect` LoRA folders into a memory-mapped dataset; `write_dataset` from vectors
config      SynthConfig (`load_synth_config`), the per-stage run configs, ZooConfig
training    `train_synthesis(cfg, DIR)`, `train_vae`, `train_prior`, `train_baseline`
generate    `SynthModel.load(DIR).vectors(embeddings)`, `generate_vectors`, `vectors_to_lora`
subject_eval  `synth eval`: every method on held-out subject folders (identity benchmark)
baselines   PCA + ridge, nearest LoRA;  encoders: precomputed, ONNX face model, registry
"""
