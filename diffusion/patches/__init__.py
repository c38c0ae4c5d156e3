"""The model patcher (clone-and-record, applied late, undone bit-exactly) and what it applies:
the LoRA family (lora/), hypernetworks, textual-inversion embeddings, attention hooks, and the
fused low-rank kernel (lowrank_kernel.py + lowrank_add.c)."""
