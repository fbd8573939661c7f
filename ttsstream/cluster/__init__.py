"""Several instances as one server: what they share through Redis (``REDIS_URL``).

Each part implements an interface of the core (:class:`~ttsstream.core.ratelimit.SharedLimiter`)
and is chosen by :func:`~ttsstream.services.build_services` when ``REDIS_URL`` is set;
without it nothing here is used.
"""
