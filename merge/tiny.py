"""merge.tiny (tiny seeded merge inputs), kept for one release: it is calm_dist.testing.tiny_checkpoints now.
`python -m merge.tiny FOLDER` still writes the demo's inputs."""

import warnings

from calm_dist.moved import forwarding

__getattr__ = forwarding(__name__, "calm_dist.testing.tiny_checkpoints")

if __name__ == "__main__":
    from calm_dist.testing.tiny_checkpoints import main

    warnings.warn("python -m merge.tiny is deprecated: use python -m calm_dist.testing.tiny_checkpoints",
                  DeprecationWarning, stacklevel=1)
    main()
