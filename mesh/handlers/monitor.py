"""The monitor service (``mesh-monitor``): the mesh's health, and alerts on its figures.

Health (``mesh.monitor.health``) looks at NATS and JetStream, pings each service
(``$SRV.PING.<name>``) and counts live workers per agent type: ``ok``, ``degraded``
(a service other than registry and gateway is missing, or an agent type has no live
worker) or ``down`` (NATS, JetStream, the registry or the gateway is).

Every `MonitorConfig.interval` it evaluates the alert rules (`mesh.alerts`) over the
figures of that moment. An alert fires once its condition has held for the rule's
duration: it is written to KV ``mesh-alerts`` and published on
``mesh.alerts.<severity>.<rule>``; it resolves (and that is published too) when the
condition clears. Every change is a compare-and-set on the alert's KV entry and only
the replica whose write wins publishes, so any number of monitors raise an alert once.
An alert that fires again within the dedupe window with a value within 10% of the last
is held back as a duplicate; a silenced rule's alerts are recorded but not published;
one that stays firing is notified again after its severity's escalation delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from mesh import __version__
from mesh._control import model_reply, read_request
from mesh._directory import WorkerDirectory
from mesh._kv import BucketConfig, KvMirror, MirroredEntry, ensure_bucket, put_with_ttl
from mesh._lifecycle import Lifecycle
from mesh._micro import CONTROL_MAX_PAYLOAD, MicroService, Reply
from mesh.alerts import ANOMALY_Z, Alert, AlertRule, RollingZ, Silence, load_rules, similar
from mesh.config import MonitorConfig, RegistryConfig
from mesh.subjects import SERVICE_NAMES, Subjects, escape_token

logger = logging.getLogger(__name__)

SERVICE = "monitor"
SAMPLE_RULES = Path(__file__).resolve().parent.parent / "samples" / "alerts.json"
Status = Literal["ok", "degraded", "down"]
LEVEL: dict[str, float] = {"ok": 0.0, "degraded": 1.0, "down": 2.0}
#: Seconds an instance that stopped answering pings keeps the service degraded.
SILENT_FOR = 60.0
#: Services without which no request gets through.
ESSENTIAL = ("registry", "gateway")


class ComponentHealth(BaseModel):
    status: Status
    detail: str = ""


class HealthReport(BaseModel):
    status: Status
    components: dict[str, ComponentHealth]
    checked_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class AlertsReply(BaseModel):
    alerts: list[Alert]
    silences: list[Silence]


class SilenceRequest(BaseModel):
    rule: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    seconds: float = Field(gt=0, le=30 * 24 * 3600)
    reason: str = ""


class UnsilenceRequest(BaseModel):
    rule: str


class UnsilenceReply(BaseModel):
    removed: bool


def alerts_bucket(subjects: Subjects) -> BucketConfig:
    return BucketConfig(name=subjects.bucket("alerts"), description="mesh alerts", marker_ttl=60)


class Monitor(Lifecycle):
    """One replica of the monitor.

    Args:
        nc: A connected NATS client; the monitor does not close it.
        subjects: The mesh's names.
        config: Interval, rules file, dedupe window, escalation.
        registry_config: How worker liveness is judged.
    """

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects | None = None,
        config: MonitorConfig | None = None,
        registry_config: RegistryConfig | None = None,
    ) -> None:
        self._nc = nc
        self._subjects = subjects or Subjects()
        self._config = config or MonitorConfig()
        rules_file = Path(self._config.rules_file) if self._config.rules_file else SAMPLE_RULES
        self.rules = load_rules(rules_file.read_text())
        self.directory = WorkerDirectory(nc.jetstream(), self._subjects, registry_config)
        self._service = MicroService(
            nc,
            name=self._subjects.micro_name(SERVICE),
            version=__version__,
            description="health and alerts",
            max_payload=CONTROL_MAX_PAYLOAD,
        )
        self._kv: KeyValue | None = None
        self._mirror: KvMirror | None = None
        self._pending: dict[tuple[str, str], float] = {}
        self._scores: dict[tuple[str, str], RollingZ] = defaultdict(RollingZ)
        self._instances_seen: dict[str, dict[str, float]] = defaultdict(dict)
        self._task: asyncio.Task[None] | None = None
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        await self.directory.start()
        self._kv = await ensure_bucket(self._nc.jetstream(), alerts_bucket(self._subjects))
        self._mirror = KvMirror(self._kv)
        await self._mirror.start()
        queue = self._subjects.queue_group(SERVICE)
        endpoints = {
            "health": self._health,
            "alerts": self._alerts,
            "silence": self._silence,
            "unsilence": self._unsilence,
        }
        for op, handler in endpoints.items():
            await self._service.add_endpoint(
                op, subject=self._subjects.service(SERVICE, op), handler=handler, queue_group=queue
            )
        await self._service.start()
        self._task = asyncio.create_task(self._evaluate_forever(), name="monitor-evaluate")
        self._started = True

    async def shutdown(self, grace: float = 5.0) -> None:
        if not self._started:
            return
        self._started = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._service.stop(grace)
        if self._mirror is not None:
            await self._mirror.aclose()
        await self.directory.aclose()

    # Health

    async def health(self) -> HealthReport:
        components: dict[str, ComponentHealth] = {}
        url = self._nc.connected_url
        components["nats"] = ComponentHealth(
            status="ok" if self._nc.is_connected else "down", detail=url.netloc if url else ""
        )
        try:
            async with asyncio.timeout(1.0):
                await self._nc.jetstream().account_info()
            components["jetstream"] = ComponentHealth(status="ok")
        except Exception as exc:
            components["jetstream"] = ComponentHealth(status="down", detail=str(exc) or "no answer")
        jetstream = components["jetstream"]
        if jetstream.status == "ok":
            offline = await self._offline_replicas()
            if offline:
                components["jetstream"] = ComponentHealth(
                    status="degraded", detail=f"replicas not current: {', '.join(offline)}"
                )
        services = [s for s in SERVICE_NAMES if s != SERVICE]
        answers = await asyncio.gather(*(self._instances(s) for s in services))
        now = time.monotonic()
        for name, ids in zip(services, answers, strict=True):
            seen = self._instances_seen[name]
            for instance in ids:
                seen[instance] = now
            # An instance that answered lately and stopped: wedged, or gone without a word.
            silent = sorted(i for i, at in seen.items() if i not in ids and now - at < SILENT_FOR)
            for instance in [i for i, at in seen.items() if now - at >= SILENT_FOR]:
                del seen[instance]
            missing: Status = "down" if name in ESSENTIAL else "degraded"
            if not ids:
                status: Status = missing
            elif silent:
                status = "degraded"
            else:
                status = "ok"
            detail = f"{len(ids)} instance(s)"
            if silent:
                detail += f"; {len(silent)} stopped answering ({', '.join(silent)})"
            components[name] = ComponentHealth(status=status, detail=detail)
        live = self.directory.live_worker_counts()
        empty = sorted(t for t, n in live.items() if n == 0)
        components["workers"] = ComponentHealth(
            status="degraded" if empty else "ok",
            detail=(f"no live worker for {', '.join(empty)}; " if empty else "")
            + f"{len(self.directory.live_workers())} live worker(s)",
        )
        statuses = {c.status for c in components.values()}
        overall: Status = (
            "down" if "down" in statuses else ("degraded" if "degraded" in statuses else "ok")
        )
        return HealthReport(status=overall, components=components)

    async def _instances(self, service: str) -> set[str]:
        """The ids of the service's instances that answer a ping within the window."""
        inbox = self._nc.new_inbox()
        answered: set[str] = set()

        async def note(msg: Msg) -> None:
            if msg.data:  # not the server's "no responders" status
                with contextlib.suppress(Exception):
                    answered.add(str(orjson.loads(msg.data)["id"]))

        subscription = await self._nc.subscribe(inbox, cb=note)
        try:
            await self._nc.publish(
                f"$SRV.PING.{self._subjects.micro_name(service)}", b"", reply=inbox
            )
            await asyncio.sleep(self._config.ping_window)
        finally:
            await subscription.unsubscribe()
        return answered

    async def _offline_replicas(self) -> list[str]:
        """Replicas of mesh's buckets that are offline or behind (a cluster node down)."""
        js = self._nc.jetstream(timeout=1.0)
        behind = set()
        for bucket in (self._subjects.workers_bucket, self._subjects.placement_bucket):
            try:
                info = await js.stream_info(f"KV_{bucket}")
            except Exception:
                continue
            cluster = info.cluster
            for peer in (cluster.replicas or []) if cluster is not None else []:
                if peer.offline or not peer.current:
                    behind.add(str(peer.name))
        return sorted(behind)

    # Alerts

    def figures(self, health: HealthReport) -> dict[str, dict[str, float]]:
        """Each figure's value per subject, now."""
        workers = self.directory.live_workers()
        return {
            "live_workers": self.directory.live_worker_counts(),
            "error_rate": {w.id: w.load.error_rate for w in workers},
            "latency": {w.id: w.load.latency for w in workers},
            "cpu": {w.id: w.load.cpu for w in workers},
            "inflight_share": {
                w.id: w.load.inflight / w.load.capacity if w.load.capacity else 0.0 for w in workers
            },
            "health": {"mesh": LEVEL[health.status]},
        }

    async def evaluate(self) -> None:
        """Evaluate every rule once."""
        figures = self.figures(await self.health())
        silences = {s.rule: s for s in await self._silences()}
        now = datetime.now(UTC)
        for rule in self.rules:
            values = figures.get(rule.figure, {})
            for subject, value in values.items():
                await self._judge(rule, subject, value, now, silences.get(rule.name))
            # Subjects gone (a worker that left): their alerts resolve.
            for alert in await self._alerts_of(rule.name):
                if alert.subject not in values and alert.state != "resolved":
                    await self._judge(rule, alert.subject, None, now, None)

    async def _evaluate_forever(self) -> None:
        while True:
            try:
                await self.evaluate()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("evaluating alert rules failed")
            await asyncio.sleep(self._config.interval)

    async def _judge(
        self,
        rule: AlertRule,
        subject: str,
        value: float | None,
        now: datetime,
        silence: Silence | None,
    ) -> None:
        key = (rule.name, subject)
        breached = value is not None and rule.breached(value)
        score = self._scores[key].add(value) if value is not None else None
        if breached:
            since = self._pending.setdefault(key, time.monotonic())
            due = time.monotonic() - since >= rule.for_seconds
        else:
            self._pending.pop(key, None)
            due = False
        alert_id = f"{rule.name}.{escape_token(subject)}"
        found = await self._read(alert_id)
        if due and value is not None:
            anomaly = score is not None and abs(score) >= ANOMALY_Z
            fresh = Alert(
                id=alert_id,
                rule=rule.name,
                subject=subject,
                severity=rule.severity,
                state="firing",
                value=value,
                threshold=rule.threshold,
                description=rule.description,
                anomaly=anomaly,
                zscore=score if score is not None and abs(score) != float("inf") else None,
                fired_at=now,
                notified_at=now,
            )
            await self._fire(rule, fresh, found, now, silence)
        elif not breached and found is not None and found[0].state != "resolved":
            alert, revision = found
            was_published = alert.state == "firing"
            resolved = alert.model_copy(
                update={"state": "resolved", "resolved_at": now, "updated_at": now}
            )
            if await self._write(alert_id, resolved, revision) and was_published:
                await self._publish(resolved, "resolved")

    async def _fire(
        self,
        rule: AlertRule,
        fresh: Alert,
        found: tuple[Alert, int] | None,
        now: datetime,
        silence: Silence | None,
    ) -> None:
        previous, revision = found if found is not None else (None, None)
        if silence is not None and silence.until > now:
            if previous is None or previous.state != "silenced":
                await self._write(
                    fresh.id, fresh.model_copy(update={"state": "silenced"}), revision
                )
            return
        if previous is not None and previous.state == "firing":
            delay = self._config.escalation.get(rule.severity)
            notified = previous.notified_at or previous.fired_at or now
            if delay is not None and now - notified >= timedelta(seconds=delay):
                escalated = previous.model_copy(
                    update={
                        "notified_at": now,
                        "escalations": previous.escalations + 1,
                        "value": fresh.value,
                        "updated_at": now,
                    }
                )
                if await self._write(fresh.id, escalated, revision):
                    await self._publish(escalated, "escalated")
            return
        if (
            previous is not None
            and previous.fired_at is not None
            and now - previous.fired_at < timedelta(seconds=self._config.dedupe_window)
            and similar(previous.value, fresh.value)
        ):
            repeat = previous.model_copy(
                update={
                    "state": "firing",
                    "resolved_at": None,
                    "suppressed": previous.suppressed + 1,
                    "updated_at": now,
                }
            )
            await self._write(fresh.id, repeat, revision)  # held back: not published
            return
        if await self._write(fresh.id, fresh, revision):
            await self._publish(fresh, "firing")

    async def _publish(self, alert: Alert, event: str) -> None:
        body = alert.model_dump(mode="json")
        body["event"] = event
        logger.info("alert %s %s: %s = %s", alert.id, event, alert.rule, alert.value)
        await self._nc.publish(
            self._subjects.alerts(alert.severity, alert.rule), orjson.dumps(body)
        )

    async def _read(self, alert_id: str) -> tuple[Alert, int] | None:
        entry = self._entries().get(alert_id)
        if entry is None:
            return None
        return Alert.model_validate_json(entry.value), entry.revision

    def _entries(self) -> dict[str, MirroredEntry]:
        assert self._mirror is not None, "Monitor.start() first"
        return self._mirror.entries

    async def _write(self, alert_id: str, alert: Alert, revision: int | None) -> bool:
        """Compare-and-set; False when another replica changed the alert first."""
        data = alert.model_dump_json().encode()
        try:
            if revision is None:
                await self._bucket().create(alert_id, data)
            else:
                await self._bucket().update(alert_id, data, last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def _alerts_of(self, rule: str | None = None) -> list[Alert]:
        alerts = [
            Alert.model_validate_json(entry.value)
            for key, entry in self._entries().items()
            if not key.startswith("_silence.") and (rule is None or key.startswith(f"{rule}."))
        ]
        return sorted(alerts, key=lambda a: a.id)

    async def _silences(self) -> list[Silence]:
        now = datetime.now(UTC)
        silences = [
            Silence.model_validate_json(entry.value)
            for key, entry in self._entries().items()
            if key.startswith("_silence.")
        ]
        return [s for s in silences if s.until > now]

    def _bucket(self) -> KeyValue:
        assert self._kv is not None, "Monitor.start() first"
        return self._kv

    # Endpoints

    async def _health(self, msg: Msg) -> Reply:
        return model_reply(msg, await self.health())

    async def _alerts(self, msg: Msg) -> Reply:
        return model_reply(
            msg, AlertsReply(alerts=await self._alerts_of(), silences=await self._silences())
        )

    async def _silence(self, msg: Msg) -> Reply:
        request = read_request(msg, SilenceRequest)
        silence = Silence(
            rule=request.rule,
            until=datetime.now(UTC) + timedelta(seconds=request.seconds),
            reason=request.reason,
        )
        await put_with_ttl(
            self._nc.jetstream(),
            self._subjects.bucket("alerts"),
            f"_silence.{request.rule}",
            silence.model_dump_json().encode(),
            request.seconds,
        )
        return model_reply(msg, silence)

    async def _unsilence(self, msg: Msg) -> Reply:
        request = read_request(msg, UnsilenceRequest)
        try:
            await self._bucket().get(f"_silence.{request.rule}")
        except KeyNotFoundError:
            return model_reply(msg, UnsilenceReply(removed=False))
        await self._bucket().purge(f"_silence.{request.rule}")
        return model_reply(msg, UnsilenceReply(removed=True))
