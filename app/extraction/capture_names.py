"""Names shared by the torch-free checks and the capture code."""

BUNDLED_MINILM = "bundled:all-MiniLM-L6-v2"
SITES = {"resid": "residual stream after the block", "mlp": "MLP output", "attn": "attention output"}
