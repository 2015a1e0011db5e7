"""The job queue, and the only module that talks to Redis.

Every call has a connect and a socket timeout, so an unreachable Redis costs a request a
second or two, never a hung thread; every Redis failure surfaces as ``QueueUnavailable``
with the URL's password removed. Jobs carry only a record's id, serialized as JSON (never
pickle), and are enqueued by dotted name so the web process never imports torch.
"""
from __future__ import annotations

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from ..errors import redact

SERIALIZER = JSONSerializer


class QueueUnavailable(RuntimeError):
    """Redis could not be reached or refused the call; the message is safe to show."""


def connection(settings: dict) -> Redis:
    return Redis.from_url(settings["REDIS_URL"], socket_connect_timeout=settings.get("REDIS_CONNECT_TIMEOUT_S", 2),
                          socket_timeout=settings.get("REDIS_SOCKET_TIMEOUT_S", 5))


def job_queue(settings: dict, redis: Redis | None = None) -> Queue:
    return Queue(settings["QUEUE_NAME"], connection=redis or connection(settings), serializer=SERIALIZER)


def _unavailable(settings: dict, exc: Exception) -> QueueUnavailable:
    detail = redact(str(exc)).replace(settings.get("REDIS_URL", "") or "\0", redact(settings.get("REDIS_URL", "")))
    return QueueUnavailable(f"The job queue (Redis at {redact(settings['REDIS_URL'])}) is unreachable: {detail}")


def enqueue(settings: dict, function: str, record_id: int, description: str) -> str:
    """Put ``function(record_id)`` on the queue; return the RQ job id."""
    try:
        job = job_queue(settings).enqueue(function, record_id, job_timeout=settings["JOB_TIMEOUT_S"],
                                          result_ttl=86_400, failure_ttl=7 * 86_400, description=description)
    except RedisError as exc:
        raise _unavailable(settings, exc) from exc
    return job.id


def job_exists(settings: dict, job_id: str, redis: Redis | None = None) -> bool:
    """Whether Redis still knows the job (it does not after a flush, or a restart without persistence)."""
    try:
        Job.fetch(job_id, connection=redis or connection(settings), serializer=SERIALIZER)
    except NoSuchJobError:
        return False
    except RedisError as exc:
        raise _unavailable(settings, exc) from exc
    return True


def ping(settings: dict) -> str | None:
    """None when Redis answers; otherwise why not (redacted)."""
    try:
        connection(settings).ping()
    except RedisError as exc:
        return str(_unavailable(settings, exc))
    return None
