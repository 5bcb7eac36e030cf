"""YOLOv5 v5.0 loss with GIoU (bubbliiiing ``nets/yolo_training.py``; spec/fred.md §3).

Per level l with positives P (cells whose y_true objectness is 1), in grid units:
loc_l = mean_P(1 − GIoU); cls_l = mean over P×nc of BCE(σ(cls), smoothed one-hot); conf_l = mean over all cells
of BCE(σ(obj), tobj) with tobj = clamp(GIoU.detach(), 0) on P and 0 elsewhere;
L_l = .05·loc_l + (.5·nc/80)·cls_l + balance_l·(H_in·W_in/640²)·conf_l, balance = (.4, 1, 4) for out0/1/2.
A level without positives contributes only its conf term. BCE uses σ clipped to [1e-7, 1 − 1e-7]; everything
runs in fp32 with autocast disabled. No host synchronisation: counts stay on the device.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fred.model import ANCHORS, ANCHORS_MASK

BCE_EPS = 1e-7
BALANCE = (0.4, 1.0, 4.0)
BOX_RATIO = 0.05


def clipped_bce(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Element-wise BCE on a probability clipped to [1e-7, 1 − 1e-7]."""
    p = probability.clamp(BCE_EPS, 1.0 - BCE_EPS)
    return -target * torch.log(p) - (1.0 - target) * torch.log(1.0 - p)


def box_giou(box_a: torch.Tensor, box_b: torch.Tensor) -> torch.Tensor:
    """GIoU of boxes given as [..., (cx, cy, w, h)]."""
    a_min, a_max = box_a[..., :2] - box_a[..., 2:4] / 2, box_a[..., :2] + box_a[..., 2:4] / 2
    b_min, b_max = box_b[..., :2] - box_b[..., 2:4] / 2, box_b[..., :2] + box_b[..., 2:4] / 2
    inter_wh = (torch.minimum(a_max, b_max) - torch.maximum(a_min, b_min)).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = box_a[..., 2] * box_a[..., 3] + box_b[..., 2] * box_b[..., 3] - inter
    enclose_wh = (torch.maximum(a_max, b_max) - torch.minimum(a_min, b_min)).clamp(min=0)
    enclose = enclose_wh[..., 0] * enclose_wh[..., 1]
    return inter / union - (enclose - union) / enclose


class YOLOLoss(nn.Module):
    """Sum of the per-level YOLOv5 losses.

    ``input_shape`` is the network input (height, width). Call with the raw head outputs ``(out0, out1, out2)``
    ([B, 3·(5+nc), H_l, W_l]) and the batched targets ``(y0, y1, y2)`` ([B, 3, H_l, W_l, 5+nc], from
    :func:`fred.targets.get_target`). Returns a dict of 0-d fp32 tensors: ``loss`` = ``loc + cls + conf`` where
    each term is already weighted and summed over the levels.
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int], anchors: Sequence[Sequence[float]] = ANCHORS,
                 anchors_mask: Sequence[Sequence[int]] = ANCHORS_MASK, label_smoothing: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.input_shape = (int(input_shape[0]), int(input_shape[1]))
        self.anchors = [tuple(float(v) for v in a) for a in anchors]
        self.anchors_mask = [tuple(m) for m in anchors_mask]
        self.label_smoothing = label_smoothing
        self.balance = BALANCE
        self.box_ratio = BOX_RATIO
        self.cls_ratio = 0.5 * num_classes / 80
        self.obj_ratio = self.input_shape[0] * self.input_shape[1] / 640 ** 2

    def level_terms(self, level: int, output: torch.Tensor, y_true: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted loc, cls and conf of one level (loc and cls are 0 without positives)."""
        batch, _, grid_h, grid_w = output.shape
        n_anchors = len(self.anchors_mask[level])
        prediction = output.float().view(batch, n_anchors, 5 + self.num_classes, grid_h, grid_w)
        prediction = prediction.permute(0, 1, 3, 4, 2)
        y_true = y_true.to(device=output.device, dtype=torch.float32)

        stride_h, stride_w = self.input_shape[0] / grid_h, self.input_shape[1] / grid_w
        anchor_wh = torch.tensor([[self.anchors[i][0] / stride_w, self.anchors[i][1] / stride_h]
                                  for i in self.anchors_mask[level]], device=output.device).view(1, n_anchors, 1, 1, 2)
        grid_y, grid_x = torch.meshgrid(torch.arange(grid_h, device=output.device, dtype=torch.float32),
                                        torch.arange(grid_w, device=output.device, dtype=torch.float32), indexing="ij")
        grid = torch.stack([grid_x, grid_y], -1)
        sig = torch.sigmoid(prediction)
        pred_boxes = torch.cat([sig[..., :2] * 2 - 0.5 + grid, (sig[..., 2:4] * 2) ** 2 * anchor_wh], -1)

        positive = y_true[..., 4] == 1
        positive_f = positive.float()
        n_pos = positive_f.sum()
        # Non-positive cells get a fixed unit box so a degenerate prediction there cannot produce 0/0 gradients.
        safe_boxes = torch.where(positive.unsqueeze(-1), pred_boxes, torch.ones_like(pred_boxes))
        giou = box_giou(safe_boxes, y_true[..., :4])
        loc = ((1 - giou) * positive_f).sum() / n_pos.clamp(min=1)
        smoothed = y_true[..., 5:] * (1 - self.label_smoothing) + self.label_smoothing / self.num_classes
        cls_bce = clipped_bce(sig[..., 5:], smoothed).sum(-1)
        cls = (cls_bce * positive_f).sum() / (n_pos * self.num_classes).clamp(min=1)
        tobj = torch.where(positive, giou.detach().clamp(min=0), torch.zeros_like(giou))
        conf = clipped_bce(sig[..., 4], tobj).mean()
        return {"loc": loc, "cls": cls, "conf": conf}

    def forward(self, outputs: Sequence[torch.Tensor], y_trues: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Total loss and its weighted terms ``{'loss', 'loc', 'cls', 'conf'}`` (fp32, autocast off)."""
        if len(outputs) != len(self.anchors_mask) or len(y_trues) != len(self.anchors_mask):
            raise ValueError(f"expected {len(self.anchors_mask)} outputs and targets, "
                             f"got {len(outputs)} and {len(y_trues)}")
        with torch.autocast(device_type=outputs[0].device.type, enabled=False):
            loc = cls = conf = outputs[0].new_zeros((), dtype=torch.float32)
            for level, (output, y_true) in enumerate(zip(outputs, y_trues)):
                terms = self.level_terms(level, output, y_true)
                loc = loc + self.box_ratio * terms["loc"]
                cls = cls + self.cls_ratio * terms["cls"]
                conf = conf + self.balance[level] * self.obj_ratio * terms["conf"]
        return {"loss": loc + cls + conf, "loc": loc, "cls": cls, "conf": conf}
