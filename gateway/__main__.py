"""python -m llmserve.gateway [--config FILE]"""

from llmserve.common.entry import run_service
from llmserve.gateway.app import GatewayApp

if __name__ == "__main__":
    run_service("gateway", GatewayApp, lambda c: c.gateway)
