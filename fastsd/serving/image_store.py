"""Generated images kept for a while so a client can fetch them by URL (the OpenAI Images API's
`response_format: "url"`). In the REST gateway's memory, bounded in count and time: an image is
served for `ttl` seconds after it was made, and the oldest go first when more than `capacity` are
kept. Its id is 128 random bits, so the URL itself is the permission to read it (as OpenAI's signed
image URLs are), and fetching it needs no token."""
from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict

DEFAULT_TTL_S = 600.0
DEFAULT_CAPACITY = 256


class ImageStore:
    def __init__(self, ttl: float = DEFAULT_TTL_S, capacity: int = DEFAULT_CAPACITY, clock=time.monotonic):
        self.ttl, self.capacity, self.clock = ttl, capacity, clock
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        """Keep encoded PNG bytes; returns the id to fetch them by."""
        key = secrets.token_urlsafe(16)
        with self._lock:
            self._expire()
            self._items[key] = (self.clock() + self.ttl, png)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> bytes | None:
        """The PNG bytes, or None when the id is unknown or its time is up."""
        with self._lock:
            self._expire()
            item = self._items.get(key)
        return item[1] if item else None

    def _expire(self) -> None:
        now = self.clock()
        while self._items and next(iter(self._items.values()))[0] <= now:
            self._items.popitem(last=False)
