"""The requests the batcher has accepted but not started, first come first served, and what it remembers
about each while it waits: the step it arrived at, whether it was told its model is loading, and the plan of
the one request that waits for memory (so it is not tokenized and compiled again at every step).

Plain bookkeeping, no MLX: the batcher (mlx_backend/engine/batcher.py) decides when each one starts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from mlx_backend.contract import Generate
from mlx_backend.engine.plan import RequestPlan


class WaitingRequests:
    def __init__(self) -> None:
        self._queue: deque[Generate] = deque()
        self._arrived: dict[str, int] = {}  # request id -> the step it arrived at
        self._told_loading: set[str] = set()  # already sent Loading
        self._planned: tuple[str, RequestPlan] | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Generate]:
        """In arrival order, over a copy: the caller may remove requests as it goes."""
        return iter(list(self._queue))

    def add(self, command: Generate, step: int) -> None:
        self._queue.append(command)
        self._arrived[command.request_id] = step

    def holds(self, request_id: str) -> bool:
        return request_id in self._arrived

    def find(self, request_id: str) -> Generate | None:
        return next((c for c in self._queue if c.request_id == request_id), None)

    def remove(self, command: Generate) -> None:
        """It has started, failed or been aborted: forget everything about it."""
        self._queue.remove(command)
        rid = command.request_id
        self._arrived.pop(rid, None)
        self._told_loading.discard(rid)
        if self._planned is not None and self._planned[0] == rid:
            self._planned = None

    def take_all(self) -> list[Generate]:
        taken = list(self._queue)
        self._queue.clear()
        self._arrived.clear()
        self._told_loading.clear()
        self._planned = None
        return taken

    def first_time_loading(self, request_id: str) -> bool:
        """Whether it is news that this request waits for its model to load (it is then sent Loading once)."""
        if request_id in self._told_loading:
            return False
        self._told_loading.add(request_id)
        return True

    def others_for(self, model: str, starting: Generate) -> bool:
        """Whether another waiting request (not the one being started) wants the same model."""
        return any(c.model == model and c is not starting for c in self._queue)

    def plan_of(self, request_id: str) -> RequestPlan | None:
        """The plan kept for this request while it waited for memory, if any."""
        if self._planned is not None and self._planned[0] == request_id:
            return self._planned[1]
        return None

    def keep_plan(self, request_id: str, plan: RequestPlan) -> None:
        self._planned = (request_id, plan)

    def gathering(self, step: int, gather_steps: int, company: int) -> bool:
        """Whether the oldest arrival should wait for company (the caller knows a batch is decoding): through
        the `gather_steps` steps after the one it arrived in, unless `company` rows (a request asks for n) are
        already here."""
        if not gather_steps or not self._queue or sum(c.n for c in self._queue) >= company:
            return False
        return step - self._arrived[self._queue[0].request_id] <= gather_steps
