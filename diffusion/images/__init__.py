"""Images and latents as pictures: IMAGE <-> files with PNG metadata (image_io), resizing and
cropping (latent_ops), sampler previews (latent_preview) and the TAESD decoder (taesd)."""
