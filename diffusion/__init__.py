"""The model layer: torch, diffusers and transformers. Sub-packages, bottom to top (a package
imports only those before it; tests/test_layering.py checks it):

  models    what a model file holds: safe reading, family detection, ldm <-> diffusers conversion,
            the UNet / VAE wrappers, the CLIP tokenizer, devices and dtypes
  images    image files and PNG metadata, latent / image resizing, sampler previews, TAESD
  patches   the model patcher (clone-and-record) and what it applies: the LoRA family,
            hypernetworks, textual-inversion embeddings, attention hooks, the low-rank kernel
  prompts   prompt languages -> token chunks -> conditioning: ComfyUI weights, the A1111 language
            (syntax, chunking, editing schedules) and the CLIP value that encodes them
  sampling  the denoiser with CFG, samplers, schedules, noise, and `sample()`
  loaders   files -> MODEL / CLIP / VAE values (checkpoints, diffusers folders, standalone VAEs)
  demo      tiny seeded models and demo files in the real formats
"""
