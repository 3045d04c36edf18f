"""Dataset format: the task catalogue (``tasks.yaml``) and the sample manifests (``{split}.jsonl``)."""

from idrecog.data.catalogue import TaskCatalogue, TaskSpec, load_catalogue
from idrecog.data.manifest import Sample, read_manifest

__all__ = ["Sample", "TaskCatalogue", "TaskSpec", "load_catalogue", "read_manifest"]
