"""A stage is ``tasks/<stage>.py``: ``stage(p, ws) -> Result``, run by dvc.yaml as ``python -m tasks.<stage>``."""

import os as _os

if _os.environ.get("VISIONOPS_STAGE_SERVER"):  # a stage process of a flow run: run it warm (tasks/warm_stages.py)
    from tasks.warm_stages import hand_over as _hand_over

    _hand_over()
