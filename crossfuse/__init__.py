"""CrossFuse: cross-attention infrared/visible image fusion (Li & Wu, Information Fusion 2024).

Modules: `model` (networks with the official state-dict keys), `windows` (windowed cross-attention),
`losses`, `weights` (`.model` files) and `inference` (batched full-resolution fusion).
"""
