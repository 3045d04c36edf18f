"""Lightning callbacks."""

from idrecog.callbacks.classification_report import ClassificationReport
from idrecog.callbacks.jsonl import JsonlWriter
from idrecog.callbacks.mae_images import MAEReconstructionImages, make_reconstruction_grid

__all__ = ["ClassificationReport", "JsonlWriter", "MAEReconstructionImages", "make_reconstruction_grid"]
