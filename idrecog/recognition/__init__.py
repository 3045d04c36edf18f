"""Recognition: decision rules, the recognizer, the batch prediction writer, export and serving.

Import the submodules directly (``idrecog.recognition.rules`` ...): this package imports nothing heavy.
"""
