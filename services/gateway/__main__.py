"""`python -m services.gateway`: serve the OpenAI-compatible API with uvicorn.

Host, port, keys, models and NATS come from the environment (`HYDRASERVE_GATEWAY__PORT`,
`HYDRASERVE_GATEWAY__ADMIN_KEY`, `HYDRASERVE_NATS__URL`, ...; see libs/common/settings.py).
"""

from __future__ import annotations

import logging

import uvicorn

from libs.common.settings import Settings
from services.gateway.app import create_app


def main() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    uvicorn.run(create_app(settings), host=settings.gateway.host, port=settings.gateway.port,
                log_config=None, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
