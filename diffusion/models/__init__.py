"""What a model file holds and the torch modules built from it: safe reading (state_dict), the
family (detect), ldm <-> diffusers conversion (convert/), the UNet and VAE wrappers, the CLIP
tokenizer, devices and dtypes. The bottom of diffusion/: imports no other sub-package."""
