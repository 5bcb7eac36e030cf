"""FRED: an RGB + Event YOLOv5 (v5.0) drone detector (spec/fred.md). Submodules are imported on demand."""
