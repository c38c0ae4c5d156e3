"""Sampling: the k-diffusion denoiser with CFG (denoiser), sampler update rules (samplers/),
sigma schedules, initial noise, and `sample()` that ties them together."""
