"""Model parts: the first-stage autoencoder and the conditional latent diffusion model."""
