"""The image-diffusion task of the first half: config -> backbone + LoRA + objective
(`build`, `config`), the task of the training loop (`task`), sampling a run (`generate`,
`runs`), --init-from weights (`pretrained`, `edm_pickle`) and the `train`, `sample` and
`info` commands (`cli`). Import from the modules; nothing is imported here, so the command
line starts fast."""
