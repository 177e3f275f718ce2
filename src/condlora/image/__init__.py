"""The image-diffusion task of the first half: config -> backbone + LoRA + objective
(`build`, `config`), the task of the training loop and its run folders (`task`), sampling
a run (`generate`), a static LoRA's strength schedule (`strength`), a run's conditional
LoRA baked into static LoRA files (`bake`), a local diffusers U-Net as the backbone
(`diffusers_net`), --init-from weights (`pretrained`, `edm_pickle`), checks and parameter
counts (`checks`) and the `train`, `sample`, `schedule fit`, `lora bake` and `info`
commands (`cli`). Import from the modules; nothing is
imported here, so the command line starts fast."""
