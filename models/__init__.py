"""What a study trains: diffusion variants, datasets, model families, the trainer and the study config."""
