"""python -m llmserve.registry [--config FILE]"""

from llmserve.common.entry import run_service
from llmserve.registry.app import RegistryApp

if __name__ == "__main__":
    run_service("registry", RegistryApp, lambda c: c.registry)
