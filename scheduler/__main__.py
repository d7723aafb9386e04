"""python -m llmserve.scheduler [--config FILE]"""

from llmserve.common.entry import run_service
from llmserve.scheduler.app import SchedulerApp

if __name__ == "__main__":
    run_service("scheduler", SchedulerApp, lambda c: c.scheduler)
