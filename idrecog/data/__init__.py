"""Dataset format: the task catalogue (``tasks.yaml``) and the sample manifests (``{split}.jsonl``)."""

from idrecog.data.manifest import Sample, read_manifest
from idrecog.tasks.catalogue import TaskCatalogue, TaskSpec, load_catalogue

__all__ = ["Sample", "TaskCatalogue", "TaskSpec", "load_catalogue", "read_manifest"]
