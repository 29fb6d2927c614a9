"""User pinning: a generation cycle binds a user (or, for callers naming no user, a client address) to one node for
SD_PIN_TTL after its last call, so progress, interrupt, skip and options reach the node that runs the job.

Pins live in the cache (shared by balancer processes) and are created atomically with `cache.add`.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from enum import Enum

from django.conf import settings
from django.core.cache import cache

from balancer import registry, routing
from balancer.routing import NodeState

LOST_JOB_TEXT = "the node serving your job went down; submit again"


@dataclass(frozen=True, kw_only=True)
class Caller:
    """Who calls the balancer: a user name (None when an open-mode caller names none) and the client address."""

    user: str | None
    is_staff: bool = False
    address: str = ""

    @property
    def pin_key(self) -> str:
        """Unnamed callers are told apart by address, so A1111 clients on different machines never share a pin."""
        return f"user:{self.user}" if self.user else f"address:{self.address}"


@dataclass(frozen=True, kw_only=True)
class Pin:
    """A user's binding to a node (of one boot: a restarted node is a new node). `generating` is set while a
    generation call is in flight, `lost` once its node failed under it."""

    node_url: str
    node_id: str
    boot_id: str
    pinned_at: float
    generating: bool = False
    lost: bool = False


@dataclass(frozen=True, kw_only=True)
class PinDecision:
    """Where a cycle's call goes: the node, its pin, and whether an existing pin was reused."""

    node: NodeState
    pin: Pin
    reused: bool


class PinState(Enum):
    LIVE = "live"  # pinned to a node that still serves
    LOST = "lost"  # the pinned node went down (or restarted) under a generation
    NONE = "none"  # no pin, or one whose node went away with nothing running


@dataclass(frozen=True, kw_only=True)
class PinLookup:
    state: PinState
    pin: Pin | None = None
    node: NodeState | None = None


def _key(pin_key: str) -> str:
    return registry.cluster_key(f"pin:{hashlib.sha256(pin_key.encode()).hexdigest()}")


# LocMem caches are per process and cannot list their keys, so this process remembers the pins it wrote (exact for
# LocMem, where no other process shares them); Redis is asked directly (count_pins).
_local_pins: dict[str, float] = {}
_local_pins_lock = threading.Lock()


def _remember_local(key: str, pin: Pin | None = None) -> None:
    _touched[key] = time.monotonic()
    if pin is not None:
        _memorize(key, pin)
    with _local_pins_lock:
        _local_pins[key] = time.monotonic() + settings.SD_PIN_TTL


# A user polling progress reads their pin several times a second; within one process a pin read less than
# PIN_MEMO_SECONDS ago is reused (a cache round trip is the largest part of a poll's cost). Only pins found are kept,
# never their absence (a user pinned by another process is seen at once), every write here updates the copy, and a
# pin is re-read before it is dropped.
PIN_MEMO_SECONDS = 1.0
_pin_memo: dict[str, tuple[float, Pin]] = {}


def _memorize(key: str, pin: Pin | None) -> None:
    if pin is None:
        _pin_memo.pop(key, None)
        return
    if len(_pin_memo) > 100_000:  # bounded; a forgotten entry only costs one cache read
        _pin_memo.clear()
    _pin_memo[key] = (time.monotonic(), pin)


def current_pin(pin_key: str, *, fresh: bool = False) -> Pin | None:
    """The caller's pin; `fresh` reads the cache even when this process read it a moment ago."""
    key = _key(pin_key)
    memo = None if fresh else _pin_memo.get(key)
    if memo is not None and time.monotonic() - memo[0] < PIN_MEMO_SECONDS:
        return memo[1]
    found = cache.get(key)
    pin = found if isinstance(found, Pin) else None
    _memorize(key, pin)
    return pin


def lookup(pin_key: str, *, fresh: bool = False) -> PinLookup:
    """The caller's pin and its node, for calls inside a cycle (progress, interrupt, skip, options).

    1. No pin: NONE.
    2. A pin whose node is healthy (draining or not: pinned users finish their cycle) with the same boot: LIVE.
    3. Otherwise the pin, read again from the cache (another process may have replaced it), is judged the same way;
       when it still fails it is dropped: LOST when a generation was running on it or had failed with it, else NONE.
    """
    pin = current_pin(pin_key, fresh=fresh)
    if pin is not None and _live_node(pin) is None and not fresh:
        pin = current_pin(pin_key, fresh=True)  # this process's copy may be stale: judge the cache's pin
    if pin is None:
        return PinLookup(state=PinState.NONE)
    node = _live_node(pin)
    if node is not None:
        return PinLookup(state=PinState.LIVE, pin=pin, node=node)
    unpin(pin_key)
    return PinLookup(
        state=PinState.LOST if pin.generating or pin.lost else PinState.NONE,
        pin=pin,
        node=routing.node_state(pin.node_url),
    )


def _live_node(pin: Pin) -> NodeState | None:
    """The pin's node when it still serves the pin: healthy (draining or not), the same boot, the pin not lost."""
    node = routing.node_state(pin.node_url)
    if not pin.lost and node is not None and node.healthy and node.boot_id == pin.boot_id:
        return node
    return None


def start_cycle(
    pin_key: str, *, model: str | None, exclude: Collection[str] = ()
) -> tuple[PinDecision | None, PinLookup]:
    """The node for a generation (or model choice) of the caller, pinned for SD_PIN_TTL.

    1. A live pin (see `lookup`) not in `exclude`, to a node that has `model`, is reused and refreshed.
    2. Otherwise choose_node picks one for `model`; the node of a pin lost just now is avoided while another
       node qualifies.
    3. The pin is written with `cache.add`: when another balancer process pinned the caller in the meantime,
       its pin wins and is used.
    Returns the decision (None when no node qualifies) and what the previous pin was.
    """
    previous = lookup(pin_key, fresh=True)  # a cycle starts from the pin every process agrees on
    if previous.state is PinState.LIVE and previous.node is not None and previous.pin is not None:
        if previous.node.url not in exclude and (model is None or previous.node.can_load(model)):
            refresh(pin_key)
            return PinDecision(node=previous.node, pin=previous.pin, reused=True), previous
        unpin(pin_key)
    avoid = set(exclude)
    if previous.state is PinState.LOST and previous.pin is not None:
        avoid.add(previous.pin.node_url)
    node = routing.choose_node(user_key=pin_key, model=model, exclude=avoid)
    if node is None and avoid != set(exclude):
        node = routing.choose_node(user_key=pin_key, model=model, exclude=exclude)
    if node is None:
        return None, previous
    pin = Pin(node_url=node.url, node_id=node.node_id, boot_id=node.boot_id, pinned_at=time.time())
    if cache.add(_key(pin_key), pin, settings.SD_PIN_TTL):
        _remember_local(_key(pin_key), pin)
        return PinDecision(node=node, pin=pin, reused=False), previous
    winner = lookup(pin_key, fresh=True)  # another process won: use its pin
    if winner.state is PinState.LIVE and winner.node is not None and winner.pin is not None:
        return PinDecision(node=winner.node, pin=winner.pin, reused=True), previous
    cache.set(_key(pin_key), pin, settings.SD_PIN_TTL)
    _remember_local(_key(pin_key), pin)
    return PinDecision(node=node, pin=pin, reused=False), previous


_touched: dict[str, float] = {}


def refresh(pin_key: str) -> None:
    """Each call of the cycle keeps the pin SD_PIN_TTL longer. A process touches one pin at most every 1/20 of the
    TTL (a poll a second would otherwise cost a cache write a second): the pin lives 95-100% of SD_PIN_TTL after
    the last call."""
    key = _key(pin_key)
    now = time.monotonic()
    if now - _touched.get(key, -math.inf) < settings.SD_PIN_TTL / 20:
        return
    if cache.touch(key, settings.SD_PIN_TTL):
        _touched[key] = now
        _remember_local(key)
    if len(_touched) > 100_000:  # forget old entries now and then; a missing entry only costs one touch
        _touched.clear()


def mark(pin_key: str, *, generating: bool | None = None, lost: bool | None = None) -> None:
    """Record that a generation started or ended on the pin (or that its node failed under it)."""
    pin = current_pin(pin_key, fresh=True)
    if pin is None:
        return
    changed = replace(
        pin,
        generating=pin.generating if generating is None else generating,
        lost=pin.lost if lost is None else lost,
    )
    cache.set(_key(pin_key), changed, settings.SD_PIN_TTL)
    _remember_local(_key(pin_key), changed)


def restore(pin_key: str, pin: Pin) -> None:
    """Put back a pin that a refused choice replaced."""
    cache.set(_key(pin_key), pin, settings.SD_PIN_TTL)
    _remember_local(_key(pin_key), pin)


def unpin(pin_key: str) -> None:
    key = _key(pin_key)
    cache.delete(key)
    _memorize(key, None)
    with _local_pins_lock:
        _local_pins.pop(key, None)


def count_pins() -> int:
    """Live pins of this cluster (Redis: counted there; LocMem: the ones this process holds)."""
    keys = getattr(cache, "iter_keys", None)
    if keys is not None:
        return sum(1 for _ in keys(registry.cluster_key("pin:*")))
    now = time.monotonic()
    with _local_pins_lock:
        for key in [key for key, expires in _local_pins.items() if expires < now]:
            del _local_pins[key]
        return len(_local_pins)
