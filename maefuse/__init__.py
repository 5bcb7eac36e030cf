"""MaeFuse: infrared/visible fusion on a frozen MAE ViT encoder (Li et al., IEEE TIP 34, 2025; arXiv 2404.11016).

Modules: `model` (network with the released state-dict keys, size presets), `losses` (mean, fusion,
reconstruction), `modes` (the nine training modes: trainable set, forward route, loss, optimizer groups, guards),
`weights` (strict loaders and writers of the public file kinds), `data` (training pairs and images),
`inference` (`fuse`), `evaluate` (metrics, baselines, the demo quality report).
"""
