"""Sampler update rules, one function each in the k-diffusion convention, by family (classic,
dpm, multistep), their shared helpers and noise samplers (common), and the name table (registry)."""
