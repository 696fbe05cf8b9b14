"""`python -m services.gateway`: serve the OpenAI-compatible API with uvicorn.

Host, port, keys, models and NATS come from the environment (`HYDRASERVE_GATEWAY__PORT`,
`HYDRASERVE_GATEWAY__ADMIN_KEY`, `HYDRASERVE_NATS__URL`, ...; see libs/common/settings.py).
"""

from __future__ import annotations

import uvicorn

from libs.common.logging import configure_logging
from libs.common.settings import Settings
from libs.common.tracing import configure_tracing
from services.gateway.app import create_app


def main() -> None:
    configure_logging("gateway")
    configure_tracing("gateway")
    settings = Settings()
    uvicorn.run(create_app(settings), host=settings.gateway.host, port=settings.gateway.port,
                log_config=None, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
