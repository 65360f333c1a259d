"""The diffusion model: U-ViT, its noise schedule, training (pre-training and fine-tuning),
checkpoints, and sampling with DPM-Solver, classifier-free guidance and mode guidance."""
