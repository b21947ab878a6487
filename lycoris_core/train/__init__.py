"""Training LoHa / LoKr networks with kohya sd-scripts semantics (pure torch, no ComfyUI).

- `modules`: trainable LoHa/LoKr layers built on the pure ΔW functions of `algos/`.
- `targets`: sd-scripts' default module selection and network_args, from ComfyUI weight keys.
- `network`: attach/detach a network to a torch model, parameter groups, saving (sd-scripts format).
- `loop`: optimizer, LR schedule, steps, checkpoints and resume; sd-scripts command line writer.
- `sd_objective`: sd-scripts' noise / timestep / loss options (noise offset, multires noise,
  Min-SNR, debiased, huber, zero terminal SNR, flow-matching timestep sampling and weighting).
- `optimizers`: torch's optimizers, optional Lion / Prodigy / AdamW8bit, `--optimizer_args`.
"""
