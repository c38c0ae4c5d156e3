"""Key layouts: original single-file (ldm / OpenCLIP) names <-> diffusers / transformers modules,
and each module's config read from tensor shapes. One module per component."""
