"""Moved to ecanfnet.evaluate (this shim goes once the CLI imports that)."""
from ..evaluate import EvalReport, Tally, evaluate_folder, evaluate_loader, map_class_folders, write_per_class_csv

__all__ = ["EvalReport", "Tally", "evaluate_folder", "evaluate_loader", "map_class_folders", "write_per_class_csv"]
