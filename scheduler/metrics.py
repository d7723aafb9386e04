"""Prometheus metrics of the scheduler."""

from prometheus_client import Counter, Gauge, Histogram

QUEUED = Gauge("llmserve_scheduler_queued_tasks", "Tasks waiting for a worker", ["model_version"])
QUEUE_TIME = Histogram("llmserve_scheduler_queue_time_seconds", "Time from submit to dispatch", ["model_version"],
                       buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
WORKERS = Gauge("llmserve_scheduler_workers", "Workers registered in etcd")
MIGRATIONS = Counter("llmserve_scheduler_migrations_total", "Tasks whose worker was lost: migrated or refused",
                     ["outcome"])
PREEMPTING_DISPATCHES = Counter("llmserve_scheduler_preempting_dispatches_total",
                                "Tasks sent to a worker whose slots lower classes held (the worker preempts one)",
                                ["model_version", "priority"])
REFUSED_LATE = Counter("llmserve_scheduler_refused_late_total",
                       "Tasks refused at submit because their queue could not meet their deadline", ["priority"])
