"""LoRA-family files: which key patches which weight (keys), the delta formulas per module type
(weights), and reading a file into patch records with its coverage (load)."""
