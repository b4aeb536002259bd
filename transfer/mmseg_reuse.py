"""Imported by the mmengine configs bench dumps (`custom_imports`), so that mmseg's own tools load them.

`python <mmseg>/.mim/tools/test.py <work_dir>/<timestamp>.py <checkpoint>.pth` (with this checkout on PYTHONPATH)
then finds bench's registered backbones and data preprocessor, the mmcv compat ops, and may read mmengine's
checkpoints under torch's weights_only loading (the allow-list of transfer.segmentation.checkpoint_safe_globals,
registered process-wide here: this module is meant for such tool processes only).
"""
import torch

from transfer.segmentation import checkpoint_safe_globals

torch.serialization.add_safe_globals(checkpoint_safe_globals())
