"""python -m llmserve.worker [--config FILE]"""

from llmserve.common.entry import run_service
from llmserve.worker.app import WorkerApp

if __name__ == "__main__":
    run_service("worker", WorkerApp, lambda c: c.worker)
