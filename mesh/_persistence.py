"""Loading agents' saved state on activation and saving it after their handlers.

An activation remembers the version it loaded and the JSON it last saved; a save
expects that version, so an activation that was overtaken (another worker saved in
between) gets a conflict instead of overwriting newer state. After a failed save the
worker retires the activation, and the next message starts from what is saved.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mesh._conflicts import canonical_json
from mesh.errors import (
    ConflictError,
    FencedError,
    MeshError,
    NoWorkerAvailableError,
    StateNotFoundError,
)
from mesh.state import StateAccess

if TYPE_CHECKING:
    from mesh.agent import Agent

logger = logging.getLogger(__name__)

#: The version an instance holds once another writer saved over it.
OVERTAKEN = -1


class StateKeeper:
    """Loads and saves agents' state through the state service.

    Args:
        store: Where state is kept: KV directly (workers) or the state service.
        writer: Recorded with each version (the worker id).
    """

    def __init__(self, store: StateAccess, writer: str) -> None:
        self._store = store
        self._writer = writer

    async def load(self, agent: Agent) -> None:
        """Give a new instance the saved state (a fresh agent starts from its defaults).

        Raises:
            StateCorruptError: What is saved fails its checksum; the agent gets nothing.
            MeshError: The state service could not answer.
        """
        try:
            record = await self._store.get(agent.id)
        except StateNotFoundError:
            snapshot = await agent.save_state()
            agent._saved_as = (0, canonical_json(snapshot or {}))
            return
        except MeshError as exc:
            raise type(exc)(f"loading the state of {agent.id} failed: {exc.message}") from None
        except Exception as exc:  # NATS itself: a timeout, JetStream unavailable
            raise NoWorkerAvailableError(f"loading the state of {agent.id} failed: {exc}") from None
        await agent.load_state(record.state)
        agent._saved_as = (record.version, canonical_json(record.state))

    async def save(self, agent: Agent) -> None:
        """Save the agent's state if it changed since it was loaded or last saved.

        Raises:
            ConflictError: Another writer saved first and the policy did not resolve it.
            MeshError: The state service could not save it (its code: 413, 503...).
        """
        snapshot = await agent.save_state()
        if snapshot is None:
            return
        version, saved = agent._saved_as
        if version == OVERTAKEN:
            raise ConflictError(f"the state of {agent.id} was saved elsewhere; reload it")
        data = canonical_json(snapshot)
        if data == saved:
            return
        try:
            reply = await self._store.put(
                agent.id,
                snapshot,
                expected_version=version,
                policy=agent.conflict_policy,
                writer=self._writer,
                epoch=agent._epoch,
            )
        except FencedError as exc:
            agent._saved_as = (OVERTAKEN, saved)
            raise FencedError(f"{exc.message}; this message's changes were not saved") from None
        except ConflictError as exc:
            agent._saved_as = (OVERTAKEN, saved)
            raise ConflictError(
                f"the state of {agent.id} was saved elsewhere (now version"
                f" {exc.current_version}); this message's changes were not saved",
                current_version=exc.current_version,
            ) from None
        except MeshError as exc:
            # Raised as this worker's error with the store's code, not as the handler's.
            raise type(exc)(f"saving the state of {agent.id} failed: {exc.message}") from None
        except Exception as exc:  # NATS itself: a timeout, JetStream unavailable
            raise NoWorkerAvailableError(f"saving the state of {agent.id} failed: {exc}") from None
        if reply.merged and reply.state is not None:
            await agent.load_state(reply.state)
            data = canonical_json(reply.state)
        agent._saved_as = (reply.version, data)

    async def unsaved(self, agent: Agent) -> bool:
        """Whether the agent's state differs from what it last loaded or saved."""
        try:
            snapshot = await agent.save_state()
        except Exception:
            return True
        return snapshot is not None and canonical_json(snapshot) != agent._saved_as[1]

    @staticmethod
    def overtaken(agent: Agent) -> bool:
        """Whether a save found that another writer had saved a newer version."""
        return agent._saved_as[0] == OVERTAKEN
