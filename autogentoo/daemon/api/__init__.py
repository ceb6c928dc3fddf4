"""The /v1 endpoints, one module per resource, all on one Router."""

from autogentoo.daemon.routing import Router

router = Router()


def load_all() -> Router:
    # Importing the modules registers their routes on `router`.
    from autogentoo.daemon.api import (  # noqa: F401
        artifacts,
        images,
        jobs,
        kernels,
        pack,
        roots,
        shell,
        system,
        uploads,
        upstream,
    )

    return router
