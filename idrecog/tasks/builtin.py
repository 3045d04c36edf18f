"""Importing this module registers the built-in task types."""

from idrecog.tasks.classification import Classification
from idrecog.tasks.detection import Detection
from idrecog.tasks.regression import Regression
from idrecog.tasks.segmentation import Segmentation

__all__ = ["Classification", "Detection", "Regression", "Segmentation"]
