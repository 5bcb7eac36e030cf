"""Exemplar-based video colorization: frozen flow + SwinTExCo exemplar branch + trainable fusion net
(spec/colorize.md; FlowChroma's fusion system with SwinTExCo and MemFlow parts).

Modules: `lab` (sRGB <-> LAB), `flow` (frozen flow backends), `swintexco` (embed_net, nonlocal_net, colornet),
`fusion_nets`, `system` (FusionSystem), `loss` (FusionLoss), `data` (clips and references), `demo_data`, `weights`
(weight sources, SwinTExCo folders, FlowChroma checkpoints), `evaluate` (streamed evaluation), `config` (every
group, the trainer's presets, the eval subcommand), `recipe` (optimizer, schedule, one micro-batch's loss, budget,
resume signature, start-up panel) and `outputs` (the files of a run folder) for `train_colorize.py`.
"""
