"""Files -> the values loader nodes output: checkpoints and diffusers folders -> (MODEL, CLIP,
VAE), standalone VAE files. A new kind of model file gets a module here."""
