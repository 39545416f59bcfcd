"""What a study trains: the networks (EDM2 U-Net, DiT), their sizes and families, the diffusion variants (where σ
enters and where it is sampled), the denoiser's preconditioning, dropout, weight normalisation, the optimal-loss
weighting and the sampler. The trainer is in training/, the study's torch-free machinery in study/."""
