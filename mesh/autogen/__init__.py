"""AutoGen agents on mesh: `NatsAgentRuntime`, an ``autogen_core.AgentRuntime``.

Install with ``pip install 'mesh[autogen]'``. See docs/autogen.md for moving from
``GrpcWorkerAgentRuntime``.
"""

from mesh.autogen._errors import AgentHandlerError
from mesh.autogen._runtime import NatsAgentRuntime

__all__ = ["AgentHandlerError", "NatsAgentRuntime"]
