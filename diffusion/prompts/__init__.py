"""Prompt languages to conditioning: ComfyUI weights and `embedding:` words (comfy_weights), the
AUTOMATIC1111 language (a1111/: syntax, chunking, editing schedules), and the CLIP value (clip)
that tokenizes and encodes them with its patched text encoders."""
