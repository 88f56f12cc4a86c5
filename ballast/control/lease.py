"""The reconciler's leader lease, in the store: several `ballast up --ha` processes on one database serve the
API and the gateway, and one of them reconciles at a time.

The lease is one `settings` row, `holder expires-at`, taken or renewed by compare-and-swap on the value read
(an UPDATE that matches only if nobody changed the row meanwhile), so it needs no database-specific locking
and works on SQLite and PostgreSQL alike. The holder renews it on every tick; when it dies the lease expires
after `ttl_s` and the next process to ask takes it over (an event says who leads).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ballast.control.events import add_event
from ballast.store import Setting, utcnow

KEY = "reconciler_leader"


def _decode(value: str) -> tuple[str, datetime | None]:
    holder, _, until = value.partition(" ")
    try:
        return holder, datetime.fromisoformat(until)
    except ValueError:
        return holder, None


class Lease:
    def __init__(self, sessions: sessionmaker[Session], holder: str, ttl_s: float = 5.0):
        self.sessions = sessions
        self.holder = holder
        self.ttl_s = ttl_s
        self.held = False

    def hold(self) -> bool:
        """Take or renew the lease; False while another live process holds it."""
        now = utcnow()
        value = f"{self.holder} {(now + timedelta(seconds=self.ttl_s)).isoformat()}"
        try:
            with self.sessions() as s, s.begin():
                row = s.get(Setting, KEY)
                if row is None:
                    s.add(Setting(key=KEY, value=value))
                    previous = None
                else:
                    previous, until = _decode(row.value)
                    if previous != self.holder and until is not None and until > now:
                        self.held = False
                        return False
                    done = s.execute(update(Setting).where(Setting.key == KEY, Setting.value == row.value)
                                     .values(value=value).execution_options(synchronize_session=False))
                    if done.rowcount != 1:  # type: ignore[attr-defined]  # another process was quicker
                        self.held = False
                        return False
                if not self.held and previous != self.holder:
                    after = f" (took over from {previous})" if previous else ""
                    add_event(s, "-", "leader", f"platform {self.holder} reconciles{after}", holder=self.holder)
        except IntegrityError:  # two first starts at once: the other one inserted the row
            self.held = False
            return False
        self.held = True
        return True

    def release(self) -> None:
        """A clean stop hands over at once rather than after `ttl_s`."""
        if not self.held:
            return
        with self.sessions() as s, s.begin():
            row = s.get(Setting, KEY)
            if row is not None and _decode(row.value)[0] == self.holder:
                s.delete(row)
        self.held = False
