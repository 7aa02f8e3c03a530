"""A stage is ``tasks/<stage>.py``: ``stage(p, ws) -> Result``, run by dvc.yaml as ``python -m tasks.<stage>``."""
